//! Turning a layer blob into a plain tar stream: sniff the compression from the first bytes (the
//! media type can lie or be missing in docker-archive imports) and wrap the reader in the matching
//! decoder.
//!
//! gzip uses `flate2`'s pure-Rust backend, reading every gzip member (`pigz` and some registries
//! write several). zstd uses `ruzstd` (pure Rust, no system library; slower than libzstd, which
//! matters less than a 65 s C build here) through a small adapter that, unlike ruzstd's
//! `StreamingDecoder`, reads every frame of the stream and skips skippable frames, as
//! multi-threaded `zstd -T` output and `zstd:chunked` layers need.

use std::io::{self, BufRead, BufReader, Read};

use ruzstd::decoding::errors::{FrameDecoderError, ReadFrameHeaderError};
use ruzstd::decoding::{BlockDecodingStrategy, FrameDecoder};

/// The compression of a layer blob, as told by its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// An uncompressed tar stream (anything that is neither gzip nor zstd).
    None,
    /// gzip (magic `1f 8b`).
    Gzip,
    /// Zstandard (magic `28 b5 2f fd`).
    Zstd,
}

const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];
/// Largest zstd window accepted: 128 MiB, libzstd's own default decoding limit
/// (`ZSTD_WINDOWLOG_LIMIT_DEFAULT` = 27), so anything `zstd` decodes without `--long` works, and a
/// hostile frame cannot make us allocate more.
const ZSTD_MAX_WINDOW: u64 = 1 << 27;

impl Compression {
    /// Tells the compression from the first bytes of a blob (at least 4 for zstd).
    pub fn sniff(first_bytes: &[u8]) -> Compression {
        if first_bytes.starts_with(&GZIP_MAGIC) {
            Compression::Gzip
        } else if first_bytes.starts_with(&ZSTD_MAGIC) {
            Compression::Zstd
        } else {
            Compression::None
        }
    }
}

/// Reads the first bytes of `reader`, sniffs them and returns the decompressed tar stream.
pub(crate) fn decompress<'a>(mut reader: impl Read + 'a) -> io::Result<Box<dyn Read + 'a>> {
    let mut head = [0u8; ZSTD_MAGIC.len()];
    let mut len = 0;
    while len < head.len() {
        match reader.read(&mut head[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let head = &head[..len];
    let whole = io::Cursor::new(head.to_vec()).chain(reader);
    Ok(match Compression::sniff(head) {
        Compression::None => Box::new(whole),
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(whole)),
        Compression::Zstd => Box::new(ZstdFrames::new(BufReader::new(whole))),
    })
}

/// A `Read` over every zstd frame in `source`, in order.
struct ZstdFrames<R> {
    source: R,
    decoder: FrameDecoder,
    /// A frame has been started and not yet fully drained.
    in_frame: bool,
}

impl<R: BufRead> ZstdFrames<R> {
    fn new(source: R) -> Self {
        let mut decoder = FrameDecoder::new();
        decoder.set_max_window_size(ZSTD_MAX_WINDOW);
        ZstdFrames {
            source,
            decoder,
            in_frame: false,
        }
    }

    /// Starts the next data frame, skipping skippable frames. Returns `false` at the end of the
    /// stream.
    fn next_frame(&mut self) -> io::Result<bool> {
        loop {
            if self.source.fill_buf()?.is_empty() {
                return Ok(false);
            }
            match self.decoder.init(&mut self.source) {
                Ok(()) => return Ok(true),
                Err(FrameDecoderError::ReadFrameHeaderError(ReadFrameHeaderError::SkipFrame {
                    length,
                    ..
                })) => {
                    let skipped =
                        io::copy(&mut (&mut self.source).take(length.into()), &mut io::sink())?;
                    if skipped != u64::from(length) {
                        return Err(io::ErrorKind::UnexpectedEof.into());
                    }
                }
                Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
            }
        }
    }
}

impl<R: BufRead> Read for ZstdFrames<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            if self.in_frame {
                // Decode until something can be handed out or the frame is complete; the same
                // loop as ruzstd's StreamingDecoder.
                while self.decoder.can_collect() == 0 && !self.decoder.is_finished() {
                    self.decoder
                        .decode_blocks(&mut self.source, BlockDecodingStrategy::UptoBlocks(1))
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                }
                let n = self.decoder.read(buf)?;
                if n > 0 {
                    return Ok(n);
                }
                if let (Some(stored), Some(computed)) = (
                    self.decoder.get_checksum_from_data(),
                    self.decoder.get_calculated_checksum(),
                ) && stored != computed
                {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "zstd frame checksum mismatch",
                    ));
                }
                self.in_frame = false;
            }
            if !self.next_frame()? {
                return Ok(0);
            }
            self.in_frame = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sniffs_magic_numbers() {
        assert_eq!(Compression::sniff(&[0x1f, 0x8b, 8, 0]), Compression::Gzip);
        assert_eq!(Compression::sniff(&ZSTD_MAGIC), Compression::Zstd);
        assert_eq!(Compression::sniff(b"etc/passwd\0"), Compression::None);
        assert_eq!(Compression::sniff(&[0x28, 0xb5]), Compression::None);
        assert_eq!(Compression::sniff(&[]), Compression::None);
    }

    #[test]
    fn zstd_reads_every_frame_and_skips_skippable_ones() {
        use ruzstd::encoding::{CompressionLevel, compress_to_vec};
        let mut blob = compress_to_vec(&b"hello, "[..], CompressionLevel::Fastest);
        // A skippable frame: magic 0x184D2A5?, little-endian length, payload.
        blob.extend_from_slice(&[0x50, 0x2a, 0x4d, 0x18, 3, 0, 0, 0, 1, 2, 3]);
        blob.extend(compress_to_vec(&b"world"[..], CompressionLevel::Fastest));
        let mut out = Vec::new();
        decompress(&blob[..])
            .unwrap()
            .read_to_end(&mut out)
            .unwrap();
        assert_eq!(out, b"hello, world");
    }

    #[test]
    fn corrupt_zstd_is_an_error() {
        let mut blob = ZSTD_MAGIC.to_vec();
        blob.extend_from_slice(&[0xff; 16]);
        let mut out = Vec::new();
        assert!(
            decompress(&blob[..])
                .unwrap()
                .read_to_end(&mut out)
                .is_err()
        );
    }
}
