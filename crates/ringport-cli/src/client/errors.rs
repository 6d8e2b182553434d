//! Naming errors: errno names, readable messages, and per-kind counts for the client's summary.

use std::collections::BTreeMap;
use std::io;

/// Expands to a `match` from errno values to their symbolic names.
macro_rules! errno_names {
    ($code:expr; $($name:ident),* $(,)?) => {
        match $code {
            $(libc::$name => Some(stringify!($name)),)*
            _ => None,
        }
    };
}

/// Returns the symbolic name (`"ECONNRESET"`) of a common socket or system-call errno.
///
/// Aliases resolve to one name: `EWOULDBLOCK` is reported as `EAGAIN`, `ENOTSUP` as `EOPNOTSUPP`.
/// Returns `None` for codes outside the list.
pub fn errno_name(code: i32) -> Option<&'static str> {
    errno_names!(code;
        ECONNRESET, ECONNREFUSED, ECONNABORTED, EPIPE, ETIMEDOUT, EHOSTUNREACH, EHOSTDOWN,
        ENETUNREACH, ENETDOWN, ENETRESET, EADDRINUSE, EADDRNOTAVAIL, ENOTCONN, EISCONN, ESHUTDOWN,
        EINPROGRESS, EALREADY, EDESTADDRREQ, EMSGSIZE, EPROTO, EPROTOTYPE, ENOPROTOOPT,
        EPROTONOSUPPORT, EAFNOSUPPORT, EOPNOTSUPP, ENOTSOCK, EMFILE, ENFILE, ENOBUFS, ENOMEM,
        ENOSPC, ECANCELED, EAGAIN, EINTR, EINVAL, EBADF, EFAULT, EIO, EBUSY, EEXIST, ENOENT,
        EACCES, EPERM, ENOSYS, ERANGE, EOVERFLOW,
    )
}

/// Describes `err` for people: the lowercase message first, then the errno name.
///
/// OS errors read like `connection reset by peer (ECONNRESET)`; an errno without a known name
/// keeps its number (`... (os error 200)`). Errors without an OS code give their own `Display`
/// text, with a lowercase first letter.
pub fn describe(err: &io::Error) -> String {
    let Some(code) = err.raw_os_error() else {
        return lowercase_first(&err.to_string());
    };
    let text = io::Error::from_raw_os_error(code).to_string();
    let suffix = format!(" (os error {code})");
    let message = lowercase_first(text.strip_suffix(&suffix).unwrap_or(&text));
    match errno_name(code) {
        Some(name) => format!("{message} ({name})"),
        None => format!("{message}{suffix}"),
    }
}

/// Lowercases the first character of `text`, unless it starts an acronym (`EOF`, `TLS`).
fn lowercase_first(text: &str) -> String {
    let mut chars = text.chars();
    match (chars.next(), chars.next()) {
        (Some(first), second) if !second.is_some_and(char::is_uppercase) => {
            let mut out: String = first.to_lowercase().collect();
            out.push_str(&text[first.len_utf8()..]);
            out
        }
        _ => text.to_owned(),
    }
}

/// Counts failures by kind, keyed by their [`describe`] text (or a caller's kind name).
///
/// Iteration is in key order, so summaries print the same way every run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ErrorCounts {
    /// Count per kind.
    counts: BTreeMap<String, u64>,
}

impl ErrorCounts {
    /// Counts one I/O error under its [`describe`] text.
    #[cfg(test)]
    pub fn add(&mut self, err: &io::Error) {
        self.add_n(&describe(err), 1);
    }

    /// Counts one failure that is not an I/O error, such as `"echo mismatch"` or `"unexpected eof"`.
    pub fn add_kind(&mut self, kind: &str) {
        self.add_n(kind, 1);
    }

    /// Adds all of `other`'s counts to these.
    pub fn merge(&mut self, other: &ErrorCounts) {
        for (kind, n) in other.iter() {
            self.add_n(kind, n);
        }
    }

    /// Returns the number of failures of every kind together.
    pub fn total(&self) -> u64 {
        self.counts.values().sum()
    }

    /// Returns `true` when nothing was counted.
    pub fn is_empty(&self) -> bool {
        self.counts.is_empty()
    }

    /// Iterates over `(kind, count)` pairs in kind order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, u64)> + '_ {
        self.counts.iter().map(|(kind, n)| (kind.as_str(), *n))
    }

    /// Adds `n` failures of `kind`.
    fn add_n(&mut self, kind: &str, n: u64) {
        match self.counts.get_mut(kind) {
            Some(count) => *count += n,
            None => {
                self.counts.insert(kind.to_owned(), n);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_common_errnos() {
        assert_eq!(errno_name(libc::ECONNRESET), Some("ECONNRESET"));
        assert_eq!(errno_name(libc::ECONNREFUSED), Some("ECONNREFUSED"));
        assert_eq!(errno_name(libc::EPIPE), Some("EPIPE"));
        assert_eq!(errno_name(libc::EADDRINUSE), Some("EADDRINUSE"));
        assert_eq!(errno_name(libc::EWOULDBLOCK), Some("EAGAIN"));
        assert_eq!(errno_name(libc::ECANCELED), Some("ECANCELED"));
        assert_eq!(errno_name(0), None);
        assert_eq!(errno_name(-1), None);
        assert_eq!(errno_name(100_000), None);
    }

    #[test]
    fn describes_os_errors_with_lowercase_message_and_name() {
        let cases = [
            (libc::ECONNRESET, "connection reset by peer (ECONNRESET)"),
            (libc::ECONNREFUSED, "connection refused (ECONNREFUSED)"),
            (libc::EPIPE, "broken pipe (EPIPE)"),
            (libc::EADDRINUSE, "address already in use (EADDRINUSE)"),
        ];
        for (code, want) in cases {
            assert_eq!(describe(&io::Error::from_raw_os_error(code)), want);
        }
    }

    #[test]
    fn unnamed_errno_keeps_its_number() {
        let text = describe(&io::Error::from_raw_os_error(100_000));
        assert!(text.ends_with(" (os error 100000)"), "{text}");
        assert!(!text.contains("(os error 100000) (os error"), "{text}");
    }

    #[test]
    fn describes_errors_without_os_code() {
        let err = io::Error::other("Handshake failed");
        assert_eq!(describe(&err), "handshake failed");
        let err = io::Error::new(io::ErrorKind::UnexpectedEof, "EOF after 3 bytes");
        assert_eq!(describe(&err), "EOF after 3 bytes");
        let err = io::Error::other("");
        assert_eq!(describe(&err), "");
    }

    #[test]
    fn counts_by_kind_and_merges() {
        let mut a = ErrorCounts::default();
        assert!(a.is_empty());
        a.add(&io::Error::from_raw_os_error(libc::ECONNRESET));
        a.add(&io::Error::from_raw_os_error(libc::ECONNRESET));
        a.add_kind("echo mismatch");

        let mut b = ErrorCounts::default();
        b.add_kind("echo mismatch");
        b.add_kind("unexpected eof");
        a.merge(&b);

        assert!(!a.is_empty());
        assert_eq!(a.total(), 5);
        let pairs: Vec<(&str, u64)> = a.iter().collect();
        assert_eq!(
            pairs,
            [
                ("connection reset by peer (ECONNRESET)", 2),
                ("echo mismatch", 2),
                ("unexpected eof", 1),
            ]
        );
        assert_eq!(b.total(), 2);
    }
}
