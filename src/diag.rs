//! A problem found in a file an operator wrote, as `file:line: message`:
//! what every loader (configuration, schemas, policies) reports.

use std::fmt;
use std::path::PathBuf;

/// One configuration problem, located in a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub file: PathBuf,
    /// 1-based line, when the problem has a position in the file.
    pub line: Option<usize>,
    pub message: String,
}

impl Diagnostic {
    /// A problem with a whole file, not a line of it.
    pub fn in_file(file: impl Into<PathBuf>, message: impl Into<String>) -> Diagnostic {
        Diagnostic {
            file: file.into(),
            line: None,
            message: message.into(),
        }
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{}: {}", self.file.display(), line, self.message),
            None => write!(f, "{}: {}", self.file.display(), self.message),
        }
    }
}
