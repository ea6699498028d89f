//! What a received file may be called: the offered name reduced to a safe base name (or refused),
//! and the names tried, in order, when that one is taken.
//!
//! A sender names files as it likes; the receiver never lets a name choose the folder. Any path
//! in the name is dropped (`../../etc/passwd` and `/etc/passwd` become `passwd`, Windows
//! separators too), and names that cannot be a plain file name are refused outright.

use std::path::Path;

/// The longest file name accepted, in bytes: what Linux, macOS and Windows all allow.
pub const MAX_NAME_LEN: usize = 255;

/// The folder inside a receiving directory where files in progress are kept; never a name a
/// file may take.
pub const PARTIAL_DIR: &str = ".socketcomm-partial";

/// The base name a file offered as `offered` is saved under.
///
/// # Errors
/// A sentence saying why the name cannot be used: empty, only dots, a NUL byte or another
/// control character, longer than [`MAX_NAME_LEN`] bytes, or the partial-files folder's name.
pub fn safe_name(offered: &str) -> Result<String, String> {
    if offered.contains('\0') {
        return Err("the file name contains a NUL byte".into());
    }
    let base = offered
        .rsplit(['/', '\\'])
        .next()
        .unwrap_or_default()
        .trim();
    if base.is_empty() {
        return Err(format!("{offered:?} has no file name in it"));
    }
    if base.chars().all(|c| c == '.') {
        return Err(format!("{base:?} is not a file name"));
    }
    if base.chars().any(char::is_control) {
        return Err("the file name contains a control character".into());
    }
    if base.len() > MAX_NAME_LEN {
        return Err(format!(
            "the file name is {} bytes long; at most {MAX_NAME_LEN} are allowed",
            base.len()
        ));
    }
    if base == PARTIAL_DIR {
        return Err(format!("{PARTIAL_DIR:?} is reserved for files in progress"));
    }
    Ok(base.to_owned())
}

/// The names to try, in order, for a file called `name`: `name` itself, then `stem (1).ext`,
/// `stem (2).ext`, ... A received file never replaces an existing one.
pub fn candidates(name: &str) -> impl Iterator<Item = String> + '_ {
    let path = Path::new(name);
    let (stem, extension) = match (path.file_stem(), path.extension()) {
        (Some(stem), Some(ext)) if !stem.is_empty() => (
            stem.to_string_lossy().into_owned(),
            format!(".{}", ext.to_string_lossy()),
        ),
        _ => (name.to_owned(), String::new()),
    };
    std::iter::once(name.to_owned()).chain((1..).map(move |n| format!("{stem} ({n}){extension}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_reduced_to_their_base_name() {
        assert_eq!(safe_name("../../etc/passwd").unwrap(), "passwd");
        assert_eq!(safe_name("/etc/passwd").unwrap(), "passwd");
        assert_eq!(safe_name("..\\..\\boot.ini").unwrap(), "boot.ini");
        assert_eq!(safe_name("report.pdf").unwrap(), "report.pdf");
        assert_eq!(safe_name(".bashrc").unwrap(), ".bashrc");
    }

    #[test]
    fn unusable_names_are_refused() {
        for name in [
            "",
            "/",
            "dir/",
            ".",
            "..",
            "...",
            "../..",
            "a\0b",
            "tab\there",
            PARTIAL_DIR,
        ] {
            assert!(safe_name(name).is_err(), "{name:?} was accepted");
        }
        assert!(safe_name(&"x".repeat(MAX_NAME_LEN)).is_ok());
        assert!(safe_name(&"x".repeat(MAX_NAME_LEN + 1)).is_err());
    }

    #[test]
    fn taken_names_get_a_number() {
        let names: Vec<String> = candidates("report.pdf").take(3).collect();
        assert_eq!(names, ["report.pdf", "report (1).pdf", "report (2).pdf"]);
        let names: Vec<String> = candidates("README").take(2).collect();
        assert_eq!(names, ["README", "README (1)"]);
        let names: Vec<String> = candidates(".bashrc").take(2).collect();
        assert_eq!(names, [".bashrc", ".bashrc (1)"]);
    }
}
