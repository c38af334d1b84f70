//! Instance logs: the shim writes them, the API reads them.
//!
//! Format: one line per record, as the CRI logging format does:
//! `<RFC 3339 time> <stdout|stderr> <F|P> <text>`, `P` marking a partial line
//! split because it was longer than [`MAX_LINE`]. Files rotate by size:
//! `output.log` becomes `output.log.1`, `.1` becomes `.2`, up to `keep`.

use corral_proto::Timestamp;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// Longest line kept whole; longer ones are split into partial records.
pub const MAX_LINE: usize = 16 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    fn as_str(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// Splits a byte stream into records. Pure: the shim feeds it what it reads.
#[derive(Debug, Default)]
pub struct LineSplitter {
    pending: Vec<u8>,
}

impl LineSplitter {
    /// Returns the complete records (text, partial?) found after adding `data`.
    pub fn push(&mut self, data: &[u8]) -> Vec<(Vec<u8>, bool)> {
        self.pending.extend_from_slice(data);
        let mut out = Vec::new();
        loop {
            if let Some(nl) = self.pending.iter().position(|b| *b == b'\n') {
                if nl <= MAX_LINE {
                    let line: Vec<u8> = self.pending.drain(..=nl).take(nl).collect();
                    out.push((line, false));
                    continue;
                }
            }
            if self.pending.len() > MAX_LINE {
                let part: Vec<u8> = self.pending.drain(..MAX_LINE).collect();
                out.push((part, true));
                continue;
            }
            return out;
        }
    }

    /// What is left when the stream ends, as a final record.
    pub fn finish(&mut self) -> Option<Vec<u8>> {
        if self.pending.is_empty() {
            None
        } else {
            Some(std::mem::take(&mut self.pending))
        }
    }
}

pub fn format_record(at: Timestamp, stream: Stream, partial: bool, text: &[u8]) -> Vec<u8> {
    let mut rec = format!(
        "{at} {} {} ",
        stream.as_str(),
        if partial { 'P' } else { 'F' }
    )
    .into_bytes();
    rec.extend_from_slice(text);
    rec.push(b'\n');
    rec
}

/// Paths of the rotated files, newest first after the live one.
pub fn rotated(path: &Path, n: u32) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".{n}"));
    PathBuf::from(s)
}

/// Appends records to a log file and rotates it by size.
pub struct LogWriter {
    path: PathBuf,
    file: Option<File>,
    size: u64,
    max_bytes: u64,
    keep: u32,
    /// Records dropped because the file could not be written (disk full…).
    pub dropped: u64,
    /// How many of `dropped` a marker record in the file already reports.
    reported: u64,
}

impl LogWriter {
    pub fn open(path: PathBuf, max_bytes: u64, keep: u32) -> io::Result<Self> {
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        let size = file.metadata()?.len();
        Ok(Self {
            path,
            file: Some(file),
            size,
            max_bytes,
            keep,
            dropped: 0,
            reported: 0,
        })
    }

    fn rotate(&mut self) -> io::Result<()> {
        self.file = None;
        if self.keep == 0 {
            std::fs::remove_file(&self.path)?;
        } else {
            for n in (1..self.keep).rev() {
                let from = rotated(&self.path, n);
                if from.exists() {
                    std::fs::rename(&from, rotated(&self.path, n + 1))?;
                }
            }
            std::fs::rename(&self.path, rotated(&self.path, 1))?;
        }
        self.file = Some(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)?,
        );
        self.size = 0;
        Ok(())
    }

    /// Writes one record stamped `at`; a failure drops the record, counts
    /// it, and leaves the writer usable (the instance must never block on
    /// its logs). The first record written after drops is preceded by a
    /// marker record saying how many were lost, so a reader sees the gap.
    pub fn write(&mut self, at: Timestamp, record: &[u8]) {
        if self.dropped > self.reported {
            let lost = self.dropped - self.reported;
            let marker = format_record(at, Stream::Stderr, false, &dropped_marker(lost));
            if !self.append(&marker) {
                self.dropped += 1;
                return;
            }
            self.reported += lost;
        }
        if !self.append(record) {
            self.dropped += 1;
        }
    }

    /// Appends one record, rotating first when it would not fit; false when
    /// it could not be written.
    fn append(&mut self, record: &[u8]) -> bool {
        if self.size > 0
            && self.size + record.len() as u64 > self.max_bytes
            && self.rotate().is_err()
        {
            return false;
        }
        if self.file.is_none() {
            match OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)
            {
                Ok(f) => self.file = Some(f),
                Err(_) => return false,
            }
        }
        let Some(file) = self.file.as_mut() else {
            return false;
        };
        match file.write_all(record) {
            Ok(()) => {
                self.size += record.len() as u64;
                true
            }
            // A short write may have left part of the record: cut it off,
            // so the next record starts on a line of its own (shrinking
            // needs no free space).
            Err(_) => {
                let _ = file.set_len(self.size);
                false
            }
        }
    }
}

/// The text of the record that reports `lost` dropped records.
pub fn dropped_marker(lost: u64) -> Vec<u8> {
    format!("corral: {lost} log records dropped (the log file could not be written)").into_bytes()
}

/// Reads the last `tail` lines (all when `None`) across the rotated files,
/// oldest first.
pub fn read_tail(path: &Path, keep: u32, tail: Option<usize>) -> io::Result<Vec<u8>> {
    let mut files: Vec<PathBuf> = (1..=keep).rev().map(|n| rotated(path, n)).collect();
    files.push(path.to_owned());
    let mut all = Vec::new();
    for f in files {
        match std::fs::read(&f) {
            Ok(mut b) => all.append(&mut b),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    if let Some(n) = tail {
        let mut count = 0;
        let mut cut = 0;
        for (i, b) in all.iter().enumerate().rev() {
            if *b == b'\n' && i + 1 != all.len() {
                count += 1;
                if count == n {
                    cut = i + 1;
                    break;
                }
            }
        }
        if n == 0 {
            cut = all.len();
        }
        all.drain(..cut);
    }
    Ok(all)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitter_handles_chunks_and_long_lines() {
        let mut s = LineSplitter::default();
        assert!(s.push(b"hel").is_empty());
        assert_eq!(s.push(b"lo\nwor"), vec![(b"hello".to_vec(), false)]);
        assert_eq!(
            s.push(b"ld\n\n"),
            vec![(b"world".to_vec(), false), (b"".to_vec(), false)]
        );
        let long = vec![b'x'; MAX_LINE + 10];
        let recs = s.push(&long);
        assert_eq!(recs, vec![(vec![b'x'; MAX_LINE], true)]);
        assert_eq!(s.finish(), Some(vec![b'x'; 10]));
        assert_eq!(s.finish(), None);
    }

    #[test]
    fn record_format() {
        let r = format_record(Timestamp(0), Stream::Stderr, false, b"boom");
        assert_eq!(r, b"1970-01-01T00:00:00.000000000Z stderr F boom\n");
    }

    #[test]
    fn rotation_keeps_bounded_files_and_tail_reads_across_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("output.log");
        let mut w = LogWriter::open(path.clone(), 100, 2).unwrap();
        for i in 0..50 {
            w.write(
                Timestamp(0),
                format!("line {i:02} padding padding\n").as_bytes(),
            );
        }
        assert!(path.exists() && rotated(&path, 1).exists() && rotated(&path, 2).exists());
        assert!(!rotated(&path, 3).exists());
        for f in [path.clone(), rotated(&path, 1), rotated(&path, 2)] {
            assert!(std::fs::metadata(&f).unwrap().len() <= 100);
        }
        let tail = String::from_utf8(read_tail(&path, 2, Some(2)).unwrap()).unwrap();
        assert_eq!(tail, "line 48 padding padding\nline 49 padding padding\n");
        let all = String::from_utf8(read_tail(&path, 2, None).unwrap()).unwrap();
        assert!(all.ends_with("line 49 padding padding\n"));
        assert_eq!(w.dropped, 0);
    }

    #[test]
    fn records_lost_to_a_write_error_are_reported_by_the_next_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("output.log");
        let mut w = LogWriter::open(path.clone(), 1 << 20, 1).unwrap();
        w.write(Timestamp(0), b"before\n");
        // A directory where the file should be: every write fails.
        std::fs::remove_file(&path).unwrap();
        std::fs::create_dir(&path).unwrap();
        w.file = None;
        w.write(Timestamp(0), b"lost 1\n");
        w.write(Timestamp(0), b"lost 2\n");
        assert_eq!(w.dropped, 2);
        std::fs::remove_dir(&path).unwrap();
        w.write(Timestamp(0), b"after\n");
        w.write(Timestamp(0), b"later\n");
        let text = std::fs::read_to_string(&path).unwrap();
        let marker = String::from_utf8(dropped_marker(2)).unwrap();
        assert_eq!(
            text,
            format!("1970-01-01T00:00:00.000000000Z stderr F {marker}\nafter\nlater\n")
        );
        assert_eq!(
            w.dropped, 2,
            "the marker reports, it does not reset the count"
        );
    }
}
