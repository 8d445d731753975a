//! An output file that appears whole or not at all: written under a temporary name next to its
//! target and renamed over it at the end. A run that stops half-way leaves nothing behind, and the
//! target may be the very file the run reads from.
#![forbid(unsafe_code)]

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use super::CliError;

/// The output file, written under a temporary name in the same directory and renamed into place
/// by [`AtomicOutput::commit`]; dropped uncommitted, the temporary file is removed.
pub struct AtomicOutput {
    target: PathBuf,
    temp: PathBuf,
    file: Option<BufWriter<File>>,
}

impl AtomicOutput {
    pub fn create(target: &Path) -> Result<AtomicOutput, CliError> {
        let name = target.file_name().ok_or_else(|| CliError::Io {
            what: "write",
            path: target.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a file name"),
        })?;
        let mut temp_name = std::ffi::OsString::from(".");
        temp_name.push(name);
        temp_name.push(format!(".kmsctl-{}.tmp", std::process::id()));
        let temp = target.with_file_name(temp_name);
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&temp)
            .map_err(|source| CliError::Io {
                what: "create",
                path: temp.clone(),
                source,
            })?;
        Ok(AtomicOutput {
            target: target.to_path_buf(),
            temp,
            file: Some(BufWriter::new(file)),
        })
    }

    pub fn commit(mut self) -> Result<(), CliError> {
        let io_error = |source| CliError::Io {
            what: "write",
            path: self.target.clone(),
            source,
        };
        let Some(writer) = self.file.take() else {
            return Ok(());
        };
        let file = writer.into_inner().map_err(|e| io_error(e.into_error()))?;
        file.sync_all().map_err(io_error)?;
        drop(file);
        std::fs::rename(&self.temp, &self.target).map_err(io_error)
    }
}

impl Write for AtomicOutput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match &mut self.file {
            Some(file) => file.write(buf),
            None => Err(std::io::Error::other("the output is already committed")),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match &mut self.file {
            Some(file) => file.flush(),
            None => Ok(()),
        }
    }
}

impl Drop for AtomicOutput {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = std::fs::remove_file(&self.temp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_appears_only_when_committed() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out.txt");
        let mut output = AtomicOutput::create(&target).unwrap();
        output.write_all(b"line\n").unwrap();
        drop(output);
        assert!(!target.exists());
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "temporary file removed"
        );
        let mut output = AtomicOutput::create(&target).unwrap();
        output.write_all(b"line\n").unwrap();
        output.commit().unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"line\n");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
