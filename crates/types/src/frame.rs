//! The control stream of a streaming exec, between the server and the helper process that
//! runs the command inside the sandbox: frames of one kind byte, a 4-byte big-endian length,
//! and the payload.

/// Bytes for the command's stdin.
pub const DATA: u8 = b'd';
/// The command's stdin ends (with a terminal: an end-of-file character).
pub const CLOSE: u8 = b'c';
/// The terminal's window size: rows and columns, 2 bytes each, big-endian.
pub const RESIZE: u8 = b'r';
/// A signal (one byte, its number) for the command's process group.
pub const SIGNAL: u8 = b's';
/// Largest payload of one frame.
pub const MAX: usize = 1 << 20;

/// The signals a client may send a command, by name (Linux numbers): what a terminal or a
/// supervisor sends.
pub const SIGNALS: &[(&str, u8)] = &[
    ("HUP", 1),
    ("INT", 2),
    ("QUIT", 3),
    ("KILL", 9),
    ("USR1", 10),
    ("USR2", 12),
    ("TERM", 15),
    ("CONT", 18),
    ("STOP", 19),
    ("TSTP", 20),
    ("WINCH", 28),
];

/// The number of a signal named `name` (`TERM`, `SIGTERM`, or `15`), if a client may send it.
pub fn signal_number(name: &str) -> Option<u8> {
    let upper = name.trim().to_ascii_uppercase();
    let bare = upper.strip_prefix("SIG").unwrap_or(&upper);
    SIGNALS
        .iter()
        .find(|(n, num)| *n == bare || bare.parse::<u8>().ok() == Some(*num))
        .map(|(_, num)| *num)
}

/// One frame.
pub fn encode(kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(5 + payload.len());
    out.push(kind);
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// A resize frame.
pub fn resize(rows: u16, cols: u16) -> Vec<u8> {
    let mut p = rows.to_be_bytes().to_vec();
    p.extend_from_slice(&cols.to_be_bytes());
    encode(RESIZE, &p)
}

/// The (kind, length) of a frame header.
pub fn header(head: [u8; 5]) -> (u8, usize) {
    (
        head[0],
        u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signal_names() {
        assert_eq!(signal_number("TERM"), Some(15));
        assert_eq!(signal_number("sigint"), Some(2));
        assert_eq!(signal_number("9"), Some(9));
        assert_eq!(signal_number("SEGV"), None);
        assert_eq!(signal_number("11"), None);
    }

    #[test]
    fn frames_round_trip() {
        let f = resize(40, 120);
        let (kind, len) = header(f[..5].try_into().unwrap());
        assert_eq!((kind, len), (RESIZE, 4));
        assert_eq!(&f[5..], &[0, 40, 0, 120]);
        assert_eq!(encode(DATA, b"hi"), b"d\0\0\0\x02hi");
    }
}
