//! The ack file: every message id the collector acknowledged, written by `run` and read by
//! `verify` (which can follow it while the run is still writing).
//!
//! Plain text, one record a line, so it can be inspected with `grep` and `wc -l`:
//! ```text
//! #sluice-loadtest acks v2
//! #run 3f9a1c2e
//! #key 0 AbC123xy 42          key index, lookup prefix, tenant id (or - when not known)
//! 0 3f9a1c2e-1a 1764022800123456 1764022800101   key index, messageId, ack time (Unix µs),
//!                             its `timestamp` (Unix ms, or - when it had none)
//! #end                        the run finished; nothing follows
//! ```
//! Only messages that become event rows are recorded (identify calls make leads instead).
//! The ack time is taken when the collector's full answer has arrived.

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::Error;

const MAGIC: &str = "#sluice-loadtest acks v2";

/// A write key as the ack file names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRecord {
    /// Index used by the ack lines.
    pub index: usize,
    /// The key's lookup prefix (not the secret).
    pub prefix: String,
    /// Its tenant, when `run` knew it.
    pub tenant_id: Option<i64>,
}

/// One acknowledged event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AckRecord {
    /// Index of the key that sent it.
    pub key_index: usize,
    /// Its `messageId`.
    pub message_id: String,
    /// When its request was acknowledged, Unix microseconds.
    pub ack_unix_us: i64,
    /// Its `timestamp`, Unix milliseconds (`-` in the file when it had none): the writer's
    /// dedup claim key, by which `verify` finds it.
    pub client_ms: Option<i64>,
}

/// Appends to an ack file through a buffer; [`AckWriter::flush`] makes lines visible to a
/// following `verify`.
pub struct AckWriter {
    path: PathBuf,
    out: BufWriter<File>,
}

impl AckWriter {
    /// Creates (truncates) the file and writes its header.
    pub fn create(path: &Path, run_id: &str, keys: &[KeyRecord]) -> Result<AckWriter, Error> {
        let err = |source| Error::AckFile {
            path: path.to_owned(),
            source,
        };
        let file = File::create(path).map_err(err)?;
        let mut w = AckWriter {
            path: path.to_owned(),
            out: BufWriter::with_capacity(256 * 1024, file),
        };
        let mut header = format!("{MAGIC}\n#run {run_id}\n");
        for k in keys {
            let tenant = k
                .tenant_id
                .map_or_else(|| "-".to_owned(), |t| t.to_string());
            header.push_str(&format!("#key {} {} {tenant}\n", k.index, k.prefix));
        }
        w.write(header.as_bytes())?;
        w.flush()?;
        Ok(w)
    }

    /// Records one acknowledged event.
    pub fn ack(
        &mut self,
        key_index: usize,
        message_id: &str,
        ack_unix_us: i64,
        client_ms: Option<i64>,
    ) -> Result<(), Error> {
        let line = match client_ms {
            Some(ms) => format!("{key_index} {message_id} {ack_unix_us} {ms}\n"),
            None => format!("{key_index} {message_id} {ack_unix_us} -\n"),
        };
        self.write(line.as_bytes())
    }

    /// Writes buffered lines to the file.
    pub fn flush(&mut self) -> Result<(), Error> {
        self.out.flush().map_err(|source| Error::AckFile {
            path: self.path.clone(),
            source,
        })
    }

    /// Marks the run finished and flushes.
    pub fn finish(mut self) -> Result<(), Error> {
        self.write(b"#end\n")?;
        self.flush()
    }

    fn write(&mut self, bytes: &[u8]) -> Result<(), Error> {
        self.out.write_all(bytes).map_err(|source| Error::AckFile {
            path: self.path.clone(),
            source,
        })
    }
}

/// What one read of the file brought.
#[derive(Debug, Default)]
pub struct Chunk {
    /// Keys declared in the lines read.
    pub keys: Vec<KeyRecord>,
    /// Acknowledged events in the lines read.
    pub acks: Vec<AckRecord>,
}

/// Reads an ack file incrementally: each [`AckReader::read_available`] returns the complete
/// lines written since the last call, so `verify` can follow a running `run`.
pub struct AckReader {
    path: PathBuf,
    input: BufReader<File>,
    /// A line whose end has not been written yet.
    partial: String,
    line_no: u64,
    run_id: Option<String>,
    ended: bool,
}

impl AckReader {
    /// Opens the file.
    pub fn open(path: &Path) -> Result<AckReader, Error> {
        let file = File::open(path).map_err(|source| Error::AckFile {
            path: path.to_owned(),
            source,
        })?;
        Ok(AckReader {
            path: path.to_owned(),
            input: BufReader::with_capacity(256 * 1024, file),
            partial: String::new(),
            line_no: 0,
            run_id: None,
            ended: false,
        })
    }

    /// The run id, once the header is read.
    pub fn run_id(&self) -> Option<&str> {
        self.run_id.as_deref()
    }

    /// True once the `#end` line was read.
    pub fn ended(&self) -> bool {
        self.ended
    }

    /// Reads every complete line available now.
    pub fn read_available(&mut self) -> Result<Chunk, Error> {
        let mut chunk = Chunk::default();
        loop {
            let n = self
                .input
                .read_line(&mut self.partial)
                .map_err(|source| Error::AckFile {
                    path: self.path.clone(),
                    source,
                })?;
            if n == 0 || !self.partial.ends_with('\n') {
                // End of what is written so far; a partial line stays for the next call.
                return Ok(chunk);
            }
            self.line_no += 1;
            let line = std::mem::take(&mut self.partial);
            self.parse(line.trim_end_matches('\n'), &mut chunk)?;
        }
    }

    fn parse(&mut self, line: &str, chunk: &mut Chunk) -> Result<(), Error> {
        let bad = |reason: &str| Error::AckFormat {
            path: self.path.clone(),
            line: self.line_no,
            reason: reason.to_owned(),
        };
        if self.line_no == 1 {
            return if line == MAGIC {
                Ok(())
            } else {
                Err(bad("the first line is not the ack file header"))
            };
        }
        if self.ended {
            return Err(bad("lines after #end"));
        }
        let mut fields = line.split(' ');
        match fields.next() {
            Some("#run") => {
                self.run_id = Some(
                    fields
                        .next()
                        .ok_or_else(|| bad("#run without an id"))?
                        .to_owned(),
                );
            }
            Some("#key") => {
                let index = fields
                    .next()
                    .and_then(|f| f.parse().ok())
                    .ok_or_else(|| bad("#key without an index"))?;
                let prefix = fields
                    .next()
                    .ok_or_else(|| bad("#key without a prefix"))?
                    .to_owned();
                let tenant_id = match fields.next() {
                    Some("-") => None,
                    Some(t) => Some(t.parse().map_err(|_| bad("#key tenant is not a number"))?),
                    None => return Err(bad("#key without a tenant")),
                };
                chunk.keys.push(KeyRecord {
                    index,
                    prefix,
                    tenant_id,
                });
            }
            Some("#end") => self.ended = true,
            Some(first) => {
                let key_index = first
                    .parse()
                    .map_err(|_| bad("the key index is not a number"))?;
                let message_id = fields
                    .next()
                    .ok_or_else(|| bad("no message id"))?
                    .to_owned();
                let ack_unix_us = fields
                    .next()
                    .and_then(|f| f.parse().ok())
                    .ok_or_else(|| bad("no ack time"))?;
                let client_ms = match fields.next() {
                    Some("-") => None,
                    Some(ms) => Some(
                        ms.parse()
                            .map_err(|_| bad("the timestamp is not a number"))?,
                    ),
                    None => return Err(bad("no timestamp (or -)")),
                };
                chunk.acks.push(AckRecord {
                    key_index,
                    message_id,
                    ack_unix_us,
                    client_ms,
                });
            }
            None => return Err(bad("empty line")),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("sluice-acks-{name}-{}", std::process::id()))
    }

    #[test]
    fn written_acks_read_back_incrementally_until_end() {
        let path = temp("rt");
        let keys = [
            KeyRecord {
                index: 0,
                prefix: "AbC123xy".into(),
                tenant_id: Some(42),
            },
            KeyRecord {
                index: 1,
                prefix: "ZZZZZZZZ".into(),
                tenant_id: None,
            },
        ];
        let mut w = AckWriter::create(&path, "r1", &keys).unwrap();
        let mut r = AckReader::open(&path).unwrap();
        let first = r.read_available().unwrap();
        assert_eq!(first.keys, keys);
        assert_eq!(r.run_id(), Some("r1"));
        w.ack(1, "r1-a", 1_700_000_000_000_001, Some(1_700_000_000_000))
            .unwrap();
        assert!(
            r.read_available().unwrap().acks.is_empty(),
            "nothing visible before a flush"
        );
        w.flush().unwrap();
        let acks = r.read_available().unwrap().acks;
        assert_eq!(
            acks,
            vec![AckRecord {
                key_index: 1,
                message_id: "r1-a".into(),
                ack_unix_us: 1_700_000_000_000_001,
                client_ms: Some(1_700_000_000_000),
            }]
        );
        assert!(!r.ended());
        w.ack(0, "r1-b", 5, None).unwrap();
        w.finish().unwrap();
        let last = r.read_available().unwrap().acks;
        assert_eq!(last.len(), 1);
        assert_eq!(
            last[0].client_ms, None,
            "a pixel's line has - for its timestamp"
        );
        assert!(r.ended());
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn a_half_written_line_waits_for_its_end() {
        let path = temp("partial");
        let mut f = File::create(&path).unwrap();
        write!(f, "{MAGIC}\n#run r\n0 r-1 12").unwrap();
        f.flush().unwrap();
        let mut r = AckReader::open(&path).unwrap();
        assert!(r.read_available().unwrap().acks.is_empty());
        writeln!(f, "34 7").unwrap();
        f.flush().unwrap();
        assert_eq!(r.read_available().unwrap().acks[0].ack_unix_us, 1234);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn foreign_files_are_refused_with_the_line() {
        let path = temp("bad");
        std::fs::write(&path, format!("{MAGIC}\n#run r\nx r-1 5\n")).unwrap();
        let err = AckReader::open(&path)
            .unwrap()
            .read_available()
            .unwrap_err();
        assert!(err.to_string().contains("line 3"), "{err}");
        std::fs::write(&path, format!("{MAGIC}\n#run r\n0 r-1 5\n")).unwrap();
        let err = AckReader::open(&path)
            .unwrap()
            .read_available()
            .unwrap_err();
        assert!(err.to_string().contains("no timestamp"), "{err}");
        std::fs::write(&path, "hello\n").unwrap();
        assert!(AckReader::open(&path).unwrap().read_available().is_err());
        std::fs::remove_file(&path).unwrap();
    }
}
