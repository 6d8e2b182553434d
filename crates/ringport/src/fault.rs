//! Fault injection: make chosen operations fail with chosen errors, to test what an application
//! does when the kernel says no. Off unless the environment variable [`FAULTS_ENV`] is set.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::op::OpKind;

/// The environment variable that turns fault injection on when a port is built: a
/// comma-separated list of `OP=EFFECT/N` rules, where `OP` is `accept`, `connect`, `recv` or
/// `send` (pooled variants included), `EFFECT` an errno name (`ECONNRESET`, `EPIPE`, `ENOBUFS`,
/// `ECANCELED`, `EMFILE`, `ENOMEM`, `ETIMEDOUT`) or `short` (a send that sends one byte), and
/// `N` makes every Nth such operation fail (default 1: all). Example:
/// `RINGPORT_FAULTS=recv=ECONNRESET/50,send=short/7`.
///
/// A failing operation completes at once with the error (its buffer given back) without
/// reaching the kernel; a `short` send sends one byte and completes with `Ok(1)`.
pub const FAULTS_ENV: &str = "RINGPORT_FAULTS";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Effect {
    Errno(i32),
    Short,
}

#[derive(Debug)]
struct Rule {
    ops: &'static [OpKind],
    effect: Effect,
    every: u64,
    seen: AtomicU64,
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
                .ok_or_else(|| bad(rule, "expected OP=EFFECT[/N]"))?;
            let (effect, every) = match rest.split_once('/') {
                Some((e, n)) => (
                    e,
                    n.parse::<u64>()
                        .ok()
                        .filter(|&n| n > 0)
                        .ok_or_else(|| bad(rule, "N must be a positive integer"))?,
                ),
                None => (rest, 1),
            };
            let ops: &'static [OpKind] = match op {
                "accept" => &[OpKind::Accept],
                "connect" => &[OpKind::Connect],
                "recv" => &[OpKind::Recv, OpKind::RecvPooled],
                "send" => &[OpKind::Send],
                _ => return Err(bad(rule, "OP is accept, connect, recv or send")),
            };
            let effect = match effect {
                "short" if op == "send" => Effect::Short,
                "short" => return Err(bad(rule, "only sends can be short")),
                name => {
                    Effect::Errno(errno_by_name(name).ok_or_else(|| bad(rule, "unknown errno"))?)
                }
            };
            rules.push(Rule {
                ops,
                effect,
                every,
                seen: AtomicU64::new(0),
            });
        }
        Ok(Faults { rules })
    }

    /// Whether this operation is to fail, and how.
    pub(crate) fn check(&self, kind: OpKind) -> Option<Effect> {
        self.rules
            .iter()
            .filter(|r| r.ops.contains(&kind))
            .find(|r| (r.seen.fetch_add(1, Ordering::Relaxed) + 1) % r.every == 0)
            .map(|r| r.effect)
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
        "ETIMEDOUT" => libc::ETIMEDOUT,
        "ECONNREFUSED" => libc::ECONNREFUSED,
        "ECONNABORTED" => libc::ECONNABORTED,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_nth_operation_of_a_kind_fails() {
        let f = Faults::parse("recv=ECONNRESET/3, send=short").unwrap();
        let recv: Vec<_> = (0..6).map(|_| f.check(OpKind::RecvPooled)).collect();
        let reset = Some(Effect::Errno(libc::ECONNRESET));
        assert_eq!(recv, vec![None, None, reset, None, None, reset]);
        assert_eq!(f.check(OpKind::Send), Some(Effect::Short));
        assert_eq!(f.check(OpKind::Accept), None);
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
