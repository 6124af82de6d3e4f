//! Output folders written whole or not at all: built in a temporary folder beside the target, then
//! renamed into place; a previous folder is moved aside first and put back if the rename fails.
//! Used by `fedhcc report`, `fedhcc study` and `fedhcc stats`/`validate` (a new folder).

use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};

/// Builds `dir` with `build` (given the temporary folder to fill) and moves it into place. An
/// existing `dir` must be a folder that is empty or holds `marker` (made by the same command,
/// `what` names it in the error); it is replaced whole. On any error nothing is left behind and a
/// previous `dir` is unchanged.
///
/// # Errors
/// `dir` is a file or a foreign folder, `build` fails, or the folders cannot be created or moved.
pub fn replace_folder<T>(dir: &Path, marker: &str, what: &str, build: impl FnOnce(&Path) -> Result<T>) -> Result<T> {
    if dir.exists() {
        if !dir.is_dir() {
            bail!("--out {} exists and is not a folder", dir.display());
        }
        let empty = std::fs::read_dir(dir)?.next().is_none();
        if !empty && !dir.join(marker).exists() {
            bail!("--out {} exists and is not a previous {what} (no {marker}): choose another folder", dir.display());
        }
    }
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).with_context(|| format!("cannot create {}", parent.display()))?;
    let leaf = dir.file_name().map_or_else(|| "out".into(), |n| n.to_string_lossy().into_owned());
    let tmp = parent.join(format!(".{leaf}.partial-{}", std::process::id()));
    let old = parent.join(format!(".{leaf}.old-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    let result = build(&tmp).and_then(|value| {
        if dir.exists() {
            std::fs::rename(dir, &old).with_context(|| format!("cannot move the previous {} aside", dir.display()))?;
        }
        match std::fs::rename(&tmp, dir) {
            Ok(()) => {
                let _ = std::fs::remove_dir_all(&old);
                Ok(value)
            }
            Err(e) => {
                if old.exists() {
                    let _ = std::fs::rename(&old, dir);
                }
                Err(e).with_context(|| format!("cannot move {} to {}", tmp.display(), dir.display()))
            }
        }
    });
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

/// Writes `bytes` to `path` and syncs it to disk.
///
/// # Errors
/// The file cannot be created or written.
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write as _;
    let mut f = std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    f.write_all(bytes).and_then(|()| f.sync_all()).with_context(|| format!("cannot write {}", path.display()))
}

/// [`replace_folder`] with these files.
///
/// # Errors
/// As [`replace_folder`].
pub fn replace_folder_with(dir: &Path, marker: &str, what: &str, files: &[(&str, Vec<u8>)]) -> Result<()> {
    replace_folder(dir, marker, what, |tmp| {
        files.iter().try_for_each(|(name, bytes)| write_file(&tmp.join(name), bytes))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_folder_is_replaced_whole_or_left_as_it_was() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("out");
        replace_folder(&dir, "m", "thing", |d| Ok(std::fs::write(d.join("m"), "1")?)).unwrap();
        std::fs::write(dir.join("stale"), "x").unwrap();
        replace_folder(&dir, "m", "thing", |d| Ok(std::fs::write(d.join("m"), "2")?)).unwrap();
        assert_eq!(std::fs::read_to_string(dir.join("m")).unwrap(), "2");
        assert!(!dir.join("stale").exists());
        // A failing build leaves the previous folder and nothing else.
        let e = replace_folder(&dir, "m", "thing", |d| -> Result<()> {
            std::fs::write(d.join("m"), "3")?;
            bail!("broken")
        });
        assert!(e.is_err());
        assert_eq!(std::fs::read_to_string(dir.join("m")).unwrap(), "2");
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1);
        // A folder without the marker is not ours.
        let foreign = tmp.path().join("foreign");
        std::fs::create_dir(&foreign).unwrap();
        std::fs::write(foreign.join("keep"), "k").unwrap();
        let e = replace_folder(&foreign, "m", "thing", |_| Ok(())).unwrap_err().to_string();
        assert!(e.contains("not a previous thing (no m)"), "{e}");
        assert!(foreign.join("keep").exists());
    }
}
