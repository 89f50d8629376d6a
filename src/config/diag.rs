//! `file:line: message` diagnostics for configuration errors.
//!
//! Operators fix config by jumping to a line, so every error names the file
//! and, where the parser can tell, the line of the offending key or value.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

pub use crate::diag::Diagnostic;

/// Every problem found while loading a snapshot; loading reports all of them
/// at once so an operator fixes a file in one pass.
#[derive(Debug, Clone, Default)]
pub struct ConfigErrors(pub Vec<Diagnostic>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// A source file held in memory so byte spans can be turned into lines.
pub struct SourceFile {
    pub path: PathBuf,
    pub text: String,
}

impl SourceFile {
    /// Reads a file; a missing or unreadable file is itself a diagnostic.
    pub fn read(path: &Path) -> Result<Self, Diagnostic> {
        std::fs::read_to_string(path)
            .map(|text| SourceFile {
                path: path.to_path_buf(),
                text,
            })
            .map_err(|e| Diagnostic {
                file: path.to_path_buf(),
                line: None,
                message: format!("cannot read file: {e}"),
            })
    }

    /// A diagnostic at the line holding byte `span.start`.
    pub fn at(&self, span: Option<Range<usize>>, message: impl Into<String>) -> Diagnostic {
        Diagnostic {
            file: self.path.clone(),
            line: span.map(|s| line_of(&self.text, s.start)),
            message: message.into(),
        }
    }

    /// Parses TOML into `T`, turning a parse or schema error into a located diagnostic.
    pub fn parse_toml<T: serde::de::DeserializeOwned>(&self) -> Result<T, Diagnostic> {
        toml::from_str(&self.text).map_err(|e| self.at(e.span(), e.message().trim().to_string()))
    }

    /// Resolves a path named inside this file against the file's directory.
    pub fn resolve(&self, named: &str) -> PathBuf {
        resolve_relative(&self.path, named)
    }
}

/// A relative path resolves against the directory of the file that names it.
pub fn resolve_relative(file: &Path, named: &str) -> PathBuf {
    let named = Path::new(named);
    if named.is_absolute() {
        return named.to_path_buf();
    }
    file.parent().unwrap_or_else(|| Path::new(".")).join(named)
}

fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|b| **b == b'\n')
        .count()
        + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_one_based() {
        assert_eq!(line_of("a\nb\nc", 0), 1);
        assert_eq!(line_of("a\nb\nc", 2), 2);
        assert_eq!(line_of("a\nb\nc", 4), 3);
        assert_eq!(line_of("a", 99), 1);
    }

    #[test]
    fn relative_paths_follow_the_naming_file() {
        let p = resolve_relative(Path::new("/etc/pc/deploy/gateway.toml"), "../certs/a.pem");
        assert_eq!(p, Path::new("/etc/pc/deploy/../certs/a.pem"));
        let abs = resolve_relative(Path::new("deploy/gateway.toml"), "/x/y");
        assert_eq!(abs, Path::new("/x/y"));
    }
}
