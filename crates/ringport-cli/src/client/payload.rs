//! Deterministic pseudo-random byte streams for verifying echoes.
//!
//! The load generator sends the bytes of a [`Stream`] and checks what comes back against a second
//! [`Stream`] built from the same seed. The two sides may cut the stream into chunks of any size: the
//! bytes depend only on the seed and the absolute offset, never on how the stream was split.
//!
//! Word `i` (bytes `8i..8i + 8`, little-endian) is `TABLE[i % WORDS] ^ key(seed, i / WORDS)`:
//! one table of random words shared by every stream, XORed with a key for each stretch of
//! `WORDS` words, the stretch's splitmix64 output for the seed. Different seeds give different
//! keys, so a misrouted echo fails; within a stretch the table words differ, and from one
//! stretch to the next the key does, so a reordered one fails too; every byte is compared.
//! Filling and checking then cost a table read and an XOR per 8 bytes, which the compiler turns
//! into vector code: a load generator that verifies every byte of a gigabyte-per-second echo
//! must not spend its core making the bytes (one splitmix64 per word took 40% of the client's
//! time in bulk echo, where the client is the limit). It is not cryptographic; it only has to
//! make a misrouted, reordered or corrupted echo show up as a mismatch.

use std::fmt;
use std::sync::OnceLock;

/// Words in the shared table (4 KiB: stays in the L1 cache).
const WORDS: usize = 512;

/// The splitmix64 increment (the golden ratio in 64-bit fixed point).
const GOLDEN_GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;

/// The seed of the shared table.
const TABLE_SEED: u64 = 0x7269_6e67_706f_7274;

/// The splitmix64 output for `state` (already advanced).
fn mix(state: u64) -> u64 {
    let mut z = state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Output `n` of the splitmix64 generator seeded with `seed`.
fn splitmix(seed: u64, n: u64) -> u64 {
    mix(seed.wrapping_add(GOLDEN_GAMMA.wrapping_mul(n.wrapping_add(1))))
}

/// The table every stream XORs with its keys.
fn table() -> &'static [u64; WORDS] {
    static TABLE: OnceLock<[u64; WORDS]> = OnceLock::new();
    TABLE.get_or_init(|| std::array::from_fn(|i| splitmix(TABLE_SEED, i as u64)))
}

/// A deterministic pseudo-random byte stream, reproducible from its seed.
///
/// Two streams with the same seed produce the same bytes however their callers chunk them.
#[derive(Debug, Clone)]
pub struct Stream {
    seed: u64,
    /// Absolute offset of the next byte.
    position: u64,
}

impl Stream {
    /// Creates the stream for `seed`, positioned at offset 0.
    pub fn new(seed: u64) -> Stream {
        Stream { seed, position: 0 }
    }

    /// Returns the absolute offset of the next byte: how many bytes were filled or verified so far.
    pub fn position(&self) -> u64 {
        self.position
    }

    /// Word `i` of the stream.
    fn word(&self, i: u64) -> u64 {
        table()[(i % WORDS as u64) as usize] ^ splitmix(self.seed, i / WORDS as u64)
    }

    /// The byte at absolute offset `at`.
    fn byte(&self, at: u64) -> u8 {
        self.word(at / 8).to_le_bytes()[(at % 8) as usize]
    }

    /// Walks the next `len` bytes in pieces, handing each to `each`, and advances past them.
    fn walk(&mut self, len: usize, mut each: impl FnMut(Piece<'_>)) {
        let table = table();
        let mut k = 0;
        while k < len {
            let at = self.position + k as u64;
            if !at.is_multiple_of(8) || len - k < 8 {
                each(Piece::Byte {
                    k,
                    value: self.byte(at),
                });
                k += 1;
                continue;
            }
            let i = at / 8;
            let first = (i % WORDS as u64) as usize;
            let n = (WORDS - first).min((len - k) / 8);
            each(Piece::Words {
                k,
                key: splitmix(self.seed, i / WORDS as u64),
                table: &table[first..first + n],
            });
            k += n * 8;
        }
        self.position += len as u64;
    }

    /// Writes the next `out.len()` bytes of the stream into `out` and advances past them.
    pub fn fill(&mut self, out: &mut [u8]) {
        self.walk(out.len(), |piece| match piece {
            Piece::Byte { k, value } => out[k] = value,
            Piece::Words { k, key, table } => {
                let dst = &mut out[k..k + table.len() * 8];
                for (d, w) in dst.chunks_exact_mut(8).zip(table) {
                    d.copy_from_slice(&(w ^ key).to_le_bytes());
                }
            }
        });
    }

    /// Checks that `got` equals the next `got.len()` bytes of the stream.
    ///
    /// The stream advances past all of `got` whether it matches or not, so that it stays aligned with
    /// the byte stream on the wire.
    ///
    /// # Errors
    ///
    /// Returns the first differing byte, with its absolute stream offset, when `got` does not match.
    pub fn verify(&mut self, got: &[u8]) -> Result<(), Mismatch> {
        let start = self.position;
        let mut bad = false;
        self.walk(got.len(), |piece| match piece {
            Piece::Byte { k, value } => bad |= got[k] != value,
            Piece::Words { k, key, table } => {
                let src = &got[k..k + table.len() * 8];
                let diff = src.chunks_exact(8).zip(table).fold(0u64, |acc, (g, w)| {
                    let mut word = [0u8; 8];
                    word.copy_from_slice(g);
                    acc | (u64::from_le_bytes(word) ^ w ^ key)
                });
                bad |= diff != 0;
            }
        });
        if !bad {
            return Ok(());
        }
        // Rare: find the first differing byte.
        let expected = Stream::new(self.seed);
        let first = got
            .iter()
            .enumerate()
            .map(|(k, &g)| (start + k as u64, g))
            .find(|&(at, g)| g != expected.byte(at));
        match first {
            Some((offset, got)) => Err(Mismatch {
                offset,
                expected: expected.byte(offset),
                got,
            }),
            None => Ok(()),
        }
    }
}

/// A piece of the stream as [`Stream::walk`] hands it out; `k` is its index in the caller's
/// slice.
enum Piece<'a> {
    /// One byte that does not start a whole word there.
    Byte { k: usize, value: u8 },
    /// Whole words, each `table[j] ^ key`.
    Words {
        k: usize,
        key: u64,
        table: &'a [u64],
    },
}

/// The first byte where received data differs from the expected stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mismatch {
    /// Absolute stream offset of the first differing byte.
    pub offset: u64,
    /// The byte the stream holds at `offset`.
    pub expected: u8,
    /// The byte that was received instead.
    pub got: u8,
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "echo mismatch at byte {}: expected 0x{:02x}, got 0x{:02x}",
            self.offset, self.expected, self.got
        )
    }
}

impl std::error::Error for Mismatch {}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small LCG to pick chunk sizes, independent of the generator under test.
    struct Sizes(u64);

    impl Sizes {
        fn next(&mut self, max: usize) -> usize {
            self.0 = self
                .0
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((self.0 >> 33) as usize) % (max + 1)
        }
    }

    fn reference(seed: u64, len: usize) -> Vec<u8> {
        let mut out = vec![0; len];
        Stream::new(seed).fill(&mut out);
        out
    }

    #[test]
    fn same_seed_same_bytes_for_any_fill_split() {
        const LEN: usize = 20_000;
        let whole = reference(42, LEN);
        for split_seed in 0..50u64 {
            let mut sizes = Sizes(split_seed);
            let max = [1, 3, 7, 8, 9, 17, 64, 5000][split_seed as usize % 8];
            let mut stream = Stream::new(42);
            let mut got = Vec::with_capacity(LEN);
            while got.len() < LEN {
                let n = sizes.next(max).min(LEN - got.len());
                let mut chunk = vec![0; n];
                stream.fill(&mut chunk);
                got.extend_from_slice(&chunk);
                assert_eq!(stream.position(), got.len() as u64);
            }
            assert_eq!(got, whole, "split seed {split_seed}, max chunk {max}");
        }
    }

    #[test]
    fn verify_accepts_fills_in_other_chunk_sizes() {
        const LEN: usize = 30_000;
        for split_seed in 0..40u64 {
            let mut sizes = Sizes(split_seed * 7 + 1);
            let fill_max = [1, 5, 8, 13, 100, 9000][split_seed as usize % 6];
            let verify_max = [2, 7, 11, 4096, 4097, 12_000][(split_seed as usize / 6) % 6];

            let mut sender = Stream::new(split_seed ^ 0xdead_beef);
            let mut wire = Vec::with_capacity(LEN);
            while wire.len() < LEN {
                let mut chunk = vec![0; sizes.next(fill_max).min(LEN - wire.len())];
                sender.fill(&mut chunk);
                wire.extend_from_slice(&chunk);
            }

            let mut verifier = Stream::new(split_seed ^ 0xdead_beef);
            let mut rest = &wire[..];
            while !rest.is_empty() {
                let n = sizes.next(verify_max).min(rest.len());
                let (chunk, tail) = rest.split_at(n);
                assert_eq!(verifier.verify(chunk), Ok(()));
                rest = tail;
            }
            assert_eq!(verifier.position(), LEN as u64);
            assert_eq!(sender.position(), LEN as u64);
        }
    }

    #[test]
    fn mismatch_reports_absolute_offset_and_keeps_alignment() {
        let mut wire = reference(7, 10_000);
        wire[5_003] ^= 0x40;
        let expected = reference(7, 10_000)[5_003];

        let mut verifier = Stream::new(7);
        assert_eq!(verifier.verify(&wire[..5_000]), Ok(()));
        let err = verifier.verify(&wire[5_000..6_000]).unwrap_err();
        assert_eq!(
            err,
            Mismatch {
                offset: 5_003,
                expected,
                got: expected ^ 0x40,
            }
        );
        // The stream advanced past the whole bad chunk and still matches what follows.
        assert_eq!(verifier.position(), 6_000);
        assert_eq!(verifier.verify(&wire[6_000..]), Ok(()));
        assert!(err.to_string().contains("byte 5003"), "{err}");
    }

    #[test]
    fn first_of_several_mismatches_across_verify_chunks_wins() {
        // Across stretches of the table, too.
        let stretch = WORDS * 8;
        let mut wire = reference(9, 3 * stretch);
        wire[stretch + 10] ^= 1;
        wire[2 * stretch + 1] ^= 1;
        let err = Stream::new(9).verify(&wire).unwrap_err();
        assert_eq!(err.offset, stretch as u64 + 10);
    }

    #[test]
    fn different_seeds_give_different_streams() {
        let a = reference(1, 64);
        let b = reference(2, 64);
        assert_ne!(a, b);
        // Not degenerate: a zero seed still produces varied bytes.
        let zero = reference(0, 256);
        let distinct = zero.iter().collect::<std::collections::BTreeSet<_>>().len();
        assert!(distinct > 100, "only {distinct} distinct byte values");
        assert_eq!(Stream::new(2).verify(&a).unwrap_err().offset, 0);
    }

    /// Data from the right stream but the wrong place fails, even a whole stretch of the table
    /// away (the same table words, another key); another seed's data fails in every stretch.
    #[test]
    fn shifted_or_misrouted_data_fails() {
        let stretch = WORDS * 8;
        let wire = reference(11, 3 * stretch);
        for shift in [1, 8, stretch, 2 * stretch] {
            let err = Stream::new(11)
                .verify(&wire[shift..shift + stretch])
                .unwrap_err();
            assert!(
                err.offset < 8,
                "shift {shift}: first mismatch at {}",
                err.offset
            );
        }
        let other = reference(12, 3 * stretch);
        for part in 0..3 {
            let range = part * stretch..(part + 1) * stretch;
            let mut s = Stream::new(11);
            s.fill(&mut vec![0; part * stretch]);
            assert!(s.verify(&other[range]).is_err(), "stretch {part}");
        }
    }

    #[test]
    fn empty_chunks_change_nothing() {
        let mut s = Stream::new(3);
        s.fill(&mut []);
        assert_eq!(s.verify(&[]), Ok(()));
        assert_eq!(s.position(), 0);
        let mut buf = [0; 5];
        s.fill(&mut buf);
        assert_eq!(&buf[..], &reference(3, 5)[..]);
    }
}
