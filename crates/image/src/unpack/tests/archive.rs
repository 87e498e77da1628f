//! A tiny tar writer for tests: raw 512-byte ustar headers, PAX `x` records and GNU `L`/`K`
//! long names, with no checks on the names, so hostile archives can be built.

/// One archive member.
#[derive(Clone, Debug)]
pub(crate) struct E {
    name: Vec<u8>,
    kind: u8,
    data: Vec<u8>,
    link: Vec<u8>,
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: u64,
    pax: Vec<(String, Vec<u8>)>,
    gnu_long: bool,
}

impl E {
    fn new(name: &str, kind: u8, mode: u32) -> E {
        E {
            name: name.as_bytes().to_vec(),
            kind,
            data: Vec::new(),
            link: Vec::new(),
            mode,
            uid: 0,
            gid: 0,
            mtime: 1_600_000_000,
            pax: Vec::new(),
            gnu_long: false,
        }
    }

    pub(crate) fn file(name: &str, data: &[u8]) -> E {
        E {
            data: data.to_vec(),
            ..E::new(name, b'0', 0o644)
        }
    }

    pub(crate) fn dir(name: &str) -> E {
        E::new(name, b'5', 0o755)
    }

    pub(crate) fn symlink(name: &str, target: &str) -> E {
        E {
            link: target.as_bytes().to_vec(),
            ..E::new(name, b'2', 0o777)
        }
    }

    pub(crate) fn hardlink(name: &str, target: &str) -> E {
        E {
            link: target.as_bytes().to_vec(),
            ..E::new(name, b'1', 0o644)
        }
    }

    pub(crate) fn char_dev(name: &str) -> E {
        E::new(name, b'3', 0o666)
    }

    pub(crate) fn block_dev(name: &str) -> E {
        E::new(name, b'4', 0o660)
    }

    pub(crate) fn fifo(name: &str) -> E {
        E::new(name, b'6', 0o600)
    }

    pub(crate) fn mode(self, mode: u32) -> E {
        E { mode, ..self }
    }

    pub(crate) fn owner(self, uid: u64, gid: u64) -> E {
        E { uid, gid, ..self }
    }

    pub(crate) fn mtime(self, mtime: u64) -> E {
        E { mtime, ..self }
    }

    /// Adds a PAX record for this member.
    pub(crate) fn pax(mut self, key: &str, value: &[u8]) -> E {
        self.pax.push((key.to_owned(), value.to_vec()));
        self
    }

    /// Writes names longer than 100 bytes as GNU `L`/`K` members instead of PAX records.
    pub(crate) fn gnu_long_names(self) -> E {
        E {
            gnu_long: true,
            ..self
        }
    }
}

/// The archive for `entries`, with the two zero blocks that end it.
pub(crate) fn tar(entries: &[E]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in entries {
        let mut pax = e.pax.clone();
        for (long, key, kind) in [(&e.name, "path", b'L'), (&e.link, "linkpath", b'K')] {
            if long.len() > 100 {
                if e.gnu_long {
                    let mut data = long.clone();
                    data.push(0);
                    member(&mut out, b"././@LongLink", kind, &data, b"", 0o644, 0, 0, 0);
                } else {
                    pax.push((key.to_owned(), long.clone()));
                }
            }
        }
        if !pax.is_empty() {
            let records = pax_records(&pax);
            member(&mut out, b"PaxHeader", b'x', &records, b"", 0o644, 0, 0, 0);
        }
        let name = &e.name[..e.name.len().min(100)];
        let link = &e.link[..e.link.len().min(100)];
        member(
            &mut out, name, e.kind, &e.data, link, e.mode, e.uid, e.gid, e.mtime,
        );
    }
    out.extend_from_slice(&[0; 1024]);
    out
}

#[allow(clippy::too_many_arguments)]
fn member(
    out: &mut Vec<u8>,
    name: &[u8],
    kind: u8,
    data: &[u8],
    link: &[u8],
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: u64,
) {
    let mut h = [0u8; 512];
    h[..name.len()].copy_from_slice(name);
    octal(&mut h[100..108], mode.into());
    octal(&mut h[108..116], uid);
    octal(&mut h[116..124], gid);
    octal(&mut h[124..136], data.len() as u64);
    octal(&mut h[136..148], mtime);
    h[156] = kind;
    h[157..157 + link.len()].copy_from_slice(link);
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    octal(&mut h[329..337], 0);
    octal(&mut h[337..345], 0);
    // The checksum is computed with its own field as spaces.
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    out.extend_from_slice(&h);
    out.extend_from_slice(data);
    out.resize(out.len().next_multiple_of(512), 0);
}

/// A zero-padded octal number filling `field` but its last byte, which is NUL.
fn octal(field: &mut [u8], value: u64) {
    let digits = format!("{value:0width$o}", width = field.len() - 1);
    assert!(digits.len() < field.len(), "{value} does not fit the field");
    field[..digits.len()].copy_from_slice(digits.as_bytes());
    field[digits.len()] = 0;
}

/// PAX records: `"<len> <key>=<value>\n"`, where `<len>` counts the whole record.
fn pax_records(records: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (key, value) in records {
        let rest = key.len() + value.len() + 3; // space, '=', newline
        let mut len = rest + 1;
        while len != rest + len.to_string().len() {
            len = rest + len.to_string().len();
        }
        out.extend_from_slice(format!("{len} {key}=").as_bytes());
        out.extend_from_slice(value);
        out.push(b'\n');
    }
    out
}
