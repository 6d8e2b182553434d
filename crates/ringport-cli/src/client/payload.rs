//! Deterministic pseudo-random byte streams for verifying echoes.
//!
//! The load generator sends the bytes of a [`Stream`] and checks what comes back against a second
//! [`Stream`] built from the same seed. The two sides may cut the stream into chunks of any size: the
//! bytes depend only on the seed and the absolute offset, never on how the stream was split.
//!
//! The generator is splitmix64: one addition and three xor-shift-multiply rounds give 8 bytes, so
//! producing the stream costs well under a nanosecond per byte. It is not cryptographic; it only has
//! to make a misrouted, reordered or corrupted echo show up as a mismatch.

use std::fmt;

/// Size of the scratch buffer [`Stream::verify`] generates the expected bytes into.
const VERIFY_CHUNK: usize = 4096;

/// The splitmix64 increment (the golden ratio in 64-bit fixed point).
const GOLDEN_GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;

/// A deterministic pseudo-random byte stream, reproducible from its seed.
///
/// Two streams with the same seed produce the same bytes however their callers chunk them.
#[derive(Debug, Clone)]
pub struct Stream {
    /// The splitmix64 state.
    state: u64,
    /// The last generated word, little-endian; its last `spare` bytes are not handed out yet.
    word: [u8; 8],
    /// How many bytes at the end of `word` are still unused (0..=7 between calls).
    spare: usize,
    /// Absolute offset of the next byte.
    position: u64,
}

impl Stream {
    /// Creates the stream for `seed`, positioned at offset 0.
    pub fn new(seed: u64) -> Stream {
        Stream {
            state: seed,
            word: [0; 8],
            spare: 0,
            position: 0,
        }
    }

    /// Returns the absolute offset of the next byte: how many bytes were filled or verified so far.
    pub fn position(&self) -> u64 {
        self.position
    }

    /// Writes the next `out.len()` bytes of the stream into `out` and advances past them.
    pub fn fill(&mut self, out: &mut [u8]) {
        self.position += out.len() as u64;

        // Hand out what is left of the previous word first.
        let take = self.spare.min(out.len());
        let start = 8 - self.spare;
        out[..take].copy_from_slice(&self.word[start..start + take]);
        self.spare -= take;
        let out = &mut out[take..];

        // Whole words straight into the output.
        let mut words = out.chunks_exact_mut(8);
        for chunk in &mut words {
            chunk.copy_from_slice(&self.next_word().to_le_bytes());
        }

        // A partial word at the end: keep the rest for the next call.
        let tail = words.into_remainder();
        if !tail.is_empty() {
            self.word = self.next_word().to_le_bytes();
            tail.copy_from_slice(&self.word[..tail.len()]);
            self.spare = 8 - tail.len();
        }
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
        let mut expected = [0u8; VERIFY_CHUNK];
        let mut first = None;
        for chunk in got.chunks(VERIFY_CHUNK) {
            let offset = self.position;
            let expected = &mut expected[..chunk.len()];
            self.fill(expected);
            if first.is_none() && expected != chunk {
                first = expected
                    .iter()
                    .zip(chunk)
                    .position(|(e, g)| e != g)
                    .map(|i| Mismatch {
                        offset: offset + i as u64,
                        expected: expected[i],
                        got: chunk[i],
                    });
            }
        }
        match first {
            None => Ok(()),
            Some(mismatch) => Err(mismatch),
        }
    }

    /// Advances the splitmix64 generator and returns its next output.
    #[inline]
    fn next_word(&mut self) -> u64 {
        self.state = self.state.wrapping_add(GOLDEN_GAMMA);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
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
        let mut wire = reference(9, 3 * VERIFY_CHUNK);
        wire[VERIFY_CHUNK + 10] ^= 1;
        wire[2 * VERIFY_CHUNK + 1] ^= 1;
        let err = Stream::new(9).verify(&wire).unwrap_err();
        assert_eq!(err.offset, VERIFY_CHUNK as u64 + 10);
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
