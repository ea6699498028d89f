//! What a received file may be called: the offered name reduced to a safe base name (or refused),
//! and the names tried, in order, when that one is taken.
//!
//! A sender names files as it likes; the receiver never lets a name choose the folder. Any path
//! in the name is dropped (`../../etc/passwd` and `/etc/passwd` become `passwd`, Windows
//! separators too), and names that cannot be a plain file name are refused outright. A name is
//! kept in Unicode's composed form (NFC), so that `café` typed on a Mac (decomposed, NFD) and
//! on Linux are one name, not two files that look alike; characters that make a name display
//! as something it is not (bidirectional overrides such as `\u{202e}`, which shows
//! `\u{202e}txt.exe` as `exe.txt`, and invisible zero-width characters) are refused, and so are
//! the names Windows reserves for devices (`CON`, `NUL`, `COM1`, ... with any extension).

use std::path::Path;

use unicode_normalization::UnicodeNormalization;

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
    if let Some(c) = base.chars().find(|&c| misleading(c)) {
        return Err(format!(
            "the file name contains U+{:04X}, which changes how a name is shown without being \
             seen (a bidirectional control or a zero-width character)",
            u32::from(c)
        ));
    }
    let base: String = base.nfc().collect();
    if windows_device(&base) {
        return Err(format!("{base:?} is a device name on Windows"));
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

/// Bidirectional controls (which reorder what follows them) and zero-width characters.
fn misleading(c: char) -> bool {
    matches!(
        c,
        '\u{061C}'
            | '\u{200B}'..='\u{200F}'
            | '\u{202A}'..='\u{202E}'
            | '\u{2060}'..='\u{2064}'
            | '\u{2066}'..='\u{2069}'
            | '\u{FEFF}'
    )
}

/// `CON`, `PRN`, `AUX`, `NUL`, `COM1`-`COM9`, `LPT1`-`LPT9`, whatever the case and extension.
fn windows_device(name: &str) -> bool {
    let stem = name.split('.').next().unwrap_or_default().trim_end();
    let upper = stem.to_ascii_uppercase();
    matches!(upper.as_str(), "CON" | "PRN" | "AUX" | "NUL")
        || (upper.len() == 4
            && (upper.starts_with("COM") || upper.starts_with("LPT"))
            && matches!(upper.as_bytes()[3], b'1'..=b'9'))
}

/// The names to try, in order, for a file called `name`: `name` itself, then `stem (1).ext`,
/// `stem (2).ext`, ... A received file never replaces an existing one. The stem is shortened
/// (at a character boundary) where the number would make a name longer than [`MAX_NAME_LEN`].
pub fn candidates(name: &str) -> impl Iterator<Item = String> + '_ {
    let path = Path::new(name);
    let (stem, extension) = match (path.file_stem(), path.extension()) {
        (Some(stem), Some(ext)) if !stem.is_empty() => (
            stem.to_string_lossy().into_owned(),
            format!(".{}", ext.to_string_lossy()),
        ),
        _ => (name.to_owned(), String::new()),
    };
    std::iter::once(name.to_owned()).chain((1..).map(move |n| {
        let number = format!(" ({n}){extension}");
        let room = MAX_NAME_LEN.saturating_sub(number.len());
        let mut cut = stem.len().min(room);
        while !stem.is_char_boundary(cut) {
            cut -= 1;
        }
        format!("{}{number}", &stem[..cut])
    }))
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
    fn names_that_mislead_are_refused_and_lookalikes_are_one_name() {
        for name in [
            "\u{202e}txt.exe",
            "in\u{200b}voice.pdf",
            "a\u{2066}b",
            "\u{feff}x",
            "CON",
            "nul.txt",
            "Com1.log",
            "lpt9",
        ] {
            assert!(safe_name(name).is_err(), "{name:?} was accepted");
        }
        // NFD (as macOS writes it) and NFC are the same name.
        assert_eq!(safe_name("cafe\u{301}.txt").unwrap(), "caf\u{e9}.txt");
        assert_eq!(safe_name("caf\u{e9}.txt").unwrap(), "caf\u{e9}.txt");
        for fine in ["console.log", "COM10", "nully", "aux-notes.txt"] {
            assert!(safe_name(fine).is_ok(), "{fine:?} was refused");
        }
    }

    #[test]
    fn a_numbered_variant_of_the_longest_name_still_fits() {
        let longest = format!("{}.txt", "\u{e9}".repeat(125)); // 250 + 4 bytes
        assert!(safe_name(&longest).is_ok());
        for variant in candidates(&longest).skip(1).take(12) {
            assert!(variant.len() <= MAX_NAME_LEN, "{} bytes", variant.len());
            assert!(variant.ends_with(").txt"), "{variant}");
        }
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
