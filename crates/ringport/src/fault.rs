//! Fault injection: make chosen operations fail with chosen errors, to test what an application
//! does when the kernel says no. Off unless the environment variable [`FAULTS_ENV`] is set.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::op::OpKind;

/// The environment variable that turns fault injection on when a port is built: a
/// comma-separated list of `OP=EFFECT/N` rules, where `OP` is `accept`, `connect`, `recv` or
/// `send` (pooled variants included), `wait` (a worker's wait for completions), or `cancel` (a
/// worker's request to cancel, with the effect `EAGAIN` only, and a `*K`), `EFFECT` an
/// errno name (`ECONNRESET`, `EPIPE`, `ENOBUFS`, `ECANCELED`, `EMFILE`, `ENFILE`, `ENOMEM`,
/// `EAGAIN` (as where io_uring cannot allocate for a request), `ETIMEDOUT`, `ECONNREFUSED`,
/// `ECONNABORTED`, `EIO`) or `short` (a send whose first part is
/// one byte),
/// and `N` makes every Nth such operation fail (default 1: all); `N*K` stops after K failures.
/// A rule counts over all of a port's workers (which worker's wait fails is not chosen), and
/// every rule counts every operation it applies to: where several are due at once, the first
/// listed decides. A `short` rule applies only to sends on stream sockets with more than a
/// byte to send (a datagram is never sent in part), and one that cannot send its byte at once
/// (the socket's buffer full) does not count as fired. Example:
/// `RINGPORT_FAULTS=recv=ECONNRESET/50,send=short/7,wait=EIO/40*1`.
///
/// A failing operation completes at once with the error (its buffer given back) without
/// reaching the kernel; a `short` send sends one byte at once and the rest as the port does
/// whenever the kernel takes only part of a send (it completes whole), or, posted with
/// [`Op::partial`](crate::Op::partial), completes with `Ok(1)`. The error
/// stays with that operation: unlike the kernel's `ECONNRESET` or `EPIPE`, it does not end the
/// connection, and later operations on the socket go ahead (an application that reacts to it
/// by closing behaves as it would against the kernel), except that a failed send on a stream
/// leaves a gap as one the kernel fails does: the sends behind it, up to the dequeue of its
/// completion, are cancelled (see [`Op::send`](crate::Op::send)). A failing
/// wait makes [`Worker::dequeue`](crate::Worker::dequeue) (or `dequeue_batch`) return
/// [`WaitError::Io`](crate::WaitError::Io) with the error, as a failing `io_uring_enter` or
/// `epoll_wait` would; nothing is lost, and the next wait may succeed. A failing cancel is one
/// the kernel would not queue (io_uring's submission queue full, and `EAGAIN` each time it was
/// submitted): the worker keeps it and asks again, within a millisecond, until it is queued.
pub const FAULTS_ENV: &str = "RINGPORT_FAULTS";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Effect {
    Errno(i32),
    Short,
}

#[derive(Debug)]
struct Rule {
    /// The operations it applies to; none for a `wait` or `cancel` rule.
    ops: &'static [OpKind],
    /// A `wait` rule.
    wait: bool,
    /// A `cancel` rule.
    cancel: bool,
    effect: Effect,
    every: u64,
    seen: AtomicU64,
    /// The most times it fires.
    limit: u64,
    fired: AtomicU64,
}

impl Rule {
    /// Counts one more operation (or wait) it applies to; whether this one is its Nth.
    fn due(&self) -> bool {
        (self.seen.fetch_add(1, Ordering::Relaxed) + 1).is_multiple_of(self.every)
    }

    /// Fires once more, unless it has fired its K times.
    fn fire(&self) -> bool {
        self.fired
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < self.limit).then_some(n + 1)
            })
            .is_ok()
    }
}

/// The parsed rules, shared by a port's workers.
#[derive(Debug)]
pub(crate) struct Faults {
    rules: Vec<Rule>,
}

impl Faults {
    /// Reads [`FAULTS_ENV`]; `Ok(None)` when it is unset or empty.
    pub(crate) fn from_env() -> io::Result<Option<Faults>> {
        match std::env::var(FAULTS_ENV) {
            Ok(v) if !v.trim().is_empty() => Faults::parse(&v).map(Some),
            Err(std::env::VarError::NotUnicode(_)) => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{FAULTS_ENV}: not valid UTF-8"),
            )),
            _ => Ok(None),
        }
    }

    pub(crate) fn parse(spec: &str) -> io::Result<Faults> {
        let bad = |rule: &str, why: &str| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{FAULTS_ENV}: bad rule `{rule}`: {why}"),
            )
        };
        let mut rules = Vec::new();
        for rule in spec.split(',').map(str::trim).filter(|r| !r.is_empty()) {
            let (op, rest) = rule
                .split_once('=')
                .ok_or_else(|| bad(rule, "expected OP=EFFECT[/N[*K]]"))?;
            let positive = |n: &str, what| {
                n.parse::<u64>()
                    .ok()
                    .filter(|&n| n > 0)
                    .ok_or_else(|| bad(rule, what))
            };
            if !rest.contains('/') && rest.contains('*') {
                return Err(bad(rule, "K needs N: OP=EFFECT/N*K"));
            }
            let (effect, every, limit) = match rest.split_once('/') {
                Some((e, n)) => match n.split_once('*') {
                    Some((n, k)) => (
                        e,
                        positive(n, "N must be a positive integer")?,
                        positive(k, "K must be a positive integer")?,
                    ),
                    None => (e, positive(n, "N must be a positive integer")?, u64::MAX),
                },
                None => (rest, 1, u64::MAX),
            };
            let ops: &'static [OpKind] = match op {
                "accept" => &[OpKind::Accept],
                "connect" => &[OpKind::Connect],
                "recv" => &[OpKind::Recv, OpKind::RecvPooled],
                "send" => &[OpKind::Send],
                "wait" | "cancel" => &[],
                _ => {
                    return Err(bad(
                        rule,
                        "OP is accept, connect, recv, send, wait or cancel",
                    ))
                }
            };
            if op == "cancel" && effect != "EAGAIN" {
                return Err(bad(rule, "a cancel can only go unqueued: cancel=EAGAIN"));
            }
            if op == "cancel" && limit == u64::MAX {
                // Every try failing, no cancel would ever be queued: nothing would shut down.
                return Err(bad(rule, "a cancel rule needs K: cancel=EAGAIN/N*K"));
            }
            let effect = match effect {
                "short" if op == "send" => Effect::Short,
                "short" => return Err(bad(rule, "only sends can be short")),
                name => {
                    Effect::Errno(errno_by_name(name).ok_or_else(|| bad(rule, "unknown errno"))?)
                }
            };
            rules.push(Rule {
                ops,
                wait: op == "wait",
                cancel: op == "cancel",
                effect,
                every,
                seen: AtomicU64::new(0),
                limit,
                fired: AtomicU64::new(0),
            });
        }
        Ok(Faults { rules })
    }

    /// Whether this operation is to fail, and how, with the rule that says so (see
    /// [`Faults::missed`]). `short_ok`: a short send can be made of it (see [`FAULTS_ENV`]).
    pub(crate) fn check(&self, kind: OpKind, short_ok: bool) -> Option<(Effect, usize)> {
        self.first_fired(|r| r.ops.contains(&kind) && (short_ok || r.effect != Effect::Short))
            .map(|i| (self.rules[i].effect, i))
    }

    /// Whether this wait for completions is to fail, and with which errno.
    pub(crate) fn check_wait(&self) -> Option<i32> {
        self.first_fired(|r| r.wait)
            .and_then(|i| match self.rules[i].effect {
                Effect::Errno(e) => Some(e),
                Effect::Short => None,
            })
    }

    /// Whether this request to cancel is to go unqueued, as one the kernel would not take.
    pub(crate) fn check_cancel(&self) -> bool {
        self.first_fired(|r| r.cancel).is_some()
    }

    /// Rule `rule` fired, but its effect could not be had (a short send that would block):
    /// it does not count as fired.
    pub(crate) fn missed(&self, rule: usize) {
        self.rules[rule].fired.fetch_sub(1, Ordering::Relaxed);
    }

    /// Counts the operation in every rule that applies to it; the first of those that is due
    /// (and has not fired its K times) fires.
    fn first_fired(&self, applies: impl Fn(&Rule) -> bool) -> Option<usize> {
        let mut hit = None;
        for (i, r) in self.rules.iter().enumerate().filter(|(_, r)| applies(r)) {
            if r.due() && hit.is_none() && r.fire() {
                hit = Some(i);
            }
        }
        hit
    }
}

fn errno_by_name(name: &str) -> Option<i32> {
    Some(match name {
        "ECONNRESET" => libc::ECONNRESET,
        "EPIPE" => libc::EPIPE,
        "ENOBUFS" => libc::ENOBUFS,
        "ECANCELED" => libc::ECANCELED,
        "EMFILE" => libc::EMFILE,
        "ENFILE" => libc::ENFILE,
        "ENOMEM" => libc::ENOMEM,
        "EAGAIN" => libc::EAGAIN,
        "ETIMEDOUT" => libc::ETIMEDOUT,
        "ECONNREFUSED" => libc::ECONNREFUSED,
        "ECONNABORTED" => libc::ECONNABORTED,
        "EIO" => libc::EIO,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_nth_operation_of_a_kind_fails() {
        let f = Faults::parse("recv=ECONNRESET/3, send=short").unwrap();
        let recv: Vec<_> = (0..6)
            .map(|_| f.check(OpKind::RecvPooled, true).map(|(e, _)| e))
            .collect();
        let reset = Some(Effect::Errno(libc::ECONNRESET));
        assert_eq!(recv, vec![None, None, reset, None, None, reset]);
        assert_eq!(
            f.check(OpKind::Send, true).map(|(e, _)| e),
            Some(Effect::Short)
        );
        assert_eq!(f.check(OpKind::Accept, true), None);
        assert_eq!(f.check_wait(), None);

        let f = Faults::parse("wait=EIO/2").unwrap();
        let waits: Vec<_> = (0..4).map(|_| f.check_wait()).collect();
        assert_eq!(waits, vec![None, Some(libc::EIO), None, Some(libc::EIO)]);
        assert_eq!(
            f.check(OpKind::RecvPooled, true),
            None,
            "a wait rule fails no operation"
        );
        assert!(
            Faults::parse("wait=short").is_err(),
            "only sends can be short"
        );

        let f = Faults::parse("wait=EIO/2*1, send=EPIPE/1*2").unwrap();
        let waits: Vec<_> = (0..6).map(|_| f.check_wait()).collect();
        assert_eq!(waits, vec![None, Some(libc::EIO), None, None, None, None]);
        let pipe = Some(Effect::Errno(libc::EPIPE));
        let sends: Vec<_> = (0..3)
            .map(|_| f.check(OpKind::Send, true).map(|(e, _)| e))
            .collect();
        assert_eq!(sends, vec![pipe, pipe, None], "K stops it");
        assert!(Faults::parse("send=EPIPE/1*0").is_err());
        assert!(Faults::parse("send=EPIPE/1*x").is_err());
        let no_n = Faults::parse("send=EPIPE*2").unwrap_err().to_string();
        assert!(no_n.contains("K needs N"), "{no_n}");

        // A cancel rule keeps requests from the kernel, and touches nothing else.
        let f = Faults::parse("cancel=EAGAIN/2*2").unwrap();
        let cancels: Vec<_> = (0..6).map(|_| f.check_cancel()).collect();
        assert_eq!(cancels, vec![false, true, false, true, false, false]);
        assert!(Faults::parse("cancel=EAGAIN/2").is_err(), "never queued");
        assert_eq!((f.check_wait(), f.check(OpKind::Recv, true)), (None, None));
        let err = Faults::parse("cancel=ECONNRESET").unwrap_err().to_string();
        assert!(err.contains("cancel=EAGAIN"), "{err}");
    }

    /// Every rule counts every operation it applies to, whichever fires: the second rule
    /// below fails the 5th receive, as it says, not a later one.
    #[test]
    fn every_rule_counts_every_operation() {
        let f = Faults::parse("recv=EIO/2, recv=ECONNRESET/5").unwrap();
        let got: Vec<_> = (0..10)
            .map(|_| f.check(OpKind::Recv, true).map(|(e, _)| e))
            .collect();
        let (eio, reset) = (
            Some(Effect::Errno(libc::EIO)),
            Some(Effect::Errno(libc::ECONNRESET)),
        );
        assert_eq!(
            got,
            vec![None, eio, None, eio, reset, eio, None, eio, None, eio],
            "the 10th is due for both: the first listed decides"
        );
    }

    /// A `short` rule passes over sends that cannot be short (datagrams, a byte or none to
    /// send), and one whose byte could not go out does not count towards its K.
    #[test]
    fn short_sends_count_only_where_they_happen() {
        let f = Faults::parse("send=short/1*1").unwrap();
        assert_eq!(f.check(OpKind::Send, false), None);
        let (effect, rule) = f.check(OpKind::Send, true).expect("fires");
        assert_eq!(effect, Effect::Short);
        f.missed(rule);
        assert!(
            f.check(OpKind::Send, true).is_some(),
            "a missed short send used up its K"
        );
        assert_eq!(f.check(OpKind::Send, true), None, "K stops it");
    }

    proptest::proptest! {
        /// Any specification either parses or is refused with an error naming the variable.
        #[test]
        fn any_spec_parses_or_is_named(spec in "[a-zA-Z=/,0-9 ]{0,40}") {
            if let Err(e) = Faults::parse(&spec) {
                proptest::prop_assert!(e.to_string().contains(FAULTS_ENV));
            }
        }
    }

    #[test]
    fn bad_rules_are_named() {
        for spec in [
            "recv",
            "recv=EWHAT",
            "bind=EPIPE",
            "recv=short",
            "send=EPIPE/0",
        ] {
            let e = Faults::parse(spec).unwrap_err();
            assert!(e.to_string().contains(FAULTS_ENV), "{e}");
        }
    }
}
