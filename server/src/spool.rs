//! The spool: the answers of the open task, on disk until the driver folds them in. The one owner
//! of the spool's file names and of its clean-up:
//!
//! ```text
//! <state_dir>/spool/<task id>/<site>.upd       a plain update (f32 payload, the model's layout)
//!                            /<site>.msk       a masked update (secure aggregation, u64 words)
//!                            /<site>.stats     a site's feature statistics
//!                            /<site>.<n>.part  an upload being received, renamed once accepted
//! ```
//!
//! The spool is emptied when the server starts (an answer of a task that did not close is asked
//! for again) and a task's folder is removed once the driver is done with it.

use crate::strategy::{StrategyError, UpdateBlocks, UpdateSource};
use fedhcc_core::params::Layout;
use std::io::Read;
use std::path::{Path, PathBuf};

/// What a spooled file holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    /// A plain update (`.upd`).
    Update,
    /// A masked update under secure aggregation (`.msk`).
    Masked,
    /// A site's feature statistics (`.stats`).
    Statistics,
}

impl Answer {
    fn extension(self) -> &'static str {
        match self {
            Answer::Update => "upd",
            Answer::Masked => "msk",
            Answer::Statistics => "stats",
        }
    }
}

/// Where one upload is received (a `.part` file per attempt) and kept once accepted.
#[derive(Clone, Debug)]
pub struct Slot {
    dir: PathBuf,
    site: String,
    fin: PathBuf,
}

impl Slot {
    /// The task's folder, to be created before the first part.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A file to receive one attempt into; `nonce` keeps two attempts apart.
    pub fn part(&self, nonce: &str) -> PathBuf {
        self.dir.join(format!("{}.{nonce}.part", self.site))
    }

    /// The name the answer takes once accepted.
    pub fn fin(&self) -> &Path {
        &self.fin
    }
}

/// The spool folder of a run.
#[derive(Clone, Debug)]
pub struct Spool {
    dir: PathBuf,
}

impl Spool {
    /// The spool at `dir`, as it is (nothing created or removed).
    pub fn at(dir: impl Into<PathBuf>) -> Self {
        Spool { dir: dir.into() }
    }

    /// `<state_dir>/spool`, emptied: what a previous run left there was never committed.
    ///
    /// # Errors
    /// The folder cannot be created.
    pub fn fresh(state_dir: &Path) -> std::io::Result<Self> {
        let spool = Spool::at(state_dir.join("spool"));
        let _ = std::fs::remove_dir_all(&spool.dir);
        std::fs::create_dir_all(&spool.dir)
            .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", spool.dir.display())))?;
        Ok(spool)
    }

    /// The folder of one task's answers.
    pub fn task_dir(&self, task_id: &str) -> PathBuf {
        self.dir.join(task_id)
    }

    /// Where `site`'s accepted answer of `task_id` is kept.
    pub fn answer(&self, task_id: &str, site: &str, kind: Answer) -> PathBuf {
        self.task_dir(task_id).join(format!("{site}.{}", kind.extension()))
    }

    /// Where an upload of `site`'s answer of `task_id` is received, then kept.
    pub fn slot(&self, task_id: &str, site: &str, kind: Answer) -> Slot {
        Slot { dir: self.task_dir(task_id), site: site.to_string(), fin: self.answer(task_id, site, kind) }
    }

    /// Removes a task's answers (the task was folded in, discarded or dropped).
    pub async fn discard(&self, task_id: &str) {
        let _ = tokio::fs::remove_dir_all(self.task_dir(task_id)).await;
    }
}

/// A spooled plain update, read back in blocks by the strategies.
pub(crate) struct SpooledUpdate {
    pub site: String,
    pub samples: u64,
    pub path: PathBuf,
}

impl UpdateSource for SpooledUpdate {
    fn site(&self) -> &str {
        &self.site
    }
    fn samples(&self) -> u64 {
        self.samples
    }
    fn read(&mut self, layout: &Layout, on_values: &mut dyn FnMut(usize, &[f32])) -> Result<(), StrategyError> {
        let err = |m: String| StrategyError::Update { site: self.site.clone(), message: m };
        let mut f = std::fs::File::open(&self.path).map_err(|e| err(format!("{}: {e}", self.path.display())))?;
        let mut reader = fedhcc_core::params::PayloadReader::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f.read(&mut buf).map_err(|e| err(format!("{}: {e}", self.path.display())))?;
            if n == 0 {
                break;
            }
            reader.push(&buf[..n], &mut *on_values)?;
            if let Some(l) = reader.layout()
                && l.fingerprint() != layout.fingerprint()
            {
                return Err(err("layout differs from the global model".into()));
            }
        }
        reader.finish()?;
        Ok(())
    }

    fn blocks(&mut self, layout: &Layout) -> Result<Box<dyn UpdateBlocks + '_>, StrategyError> {
        let err = |m: String| StrategyError::Update { site: self.site.clone(), message: m };
        let f = std::fs::File::open(&self.path).map_err(|e| err(format!("{}: {e}", self.path.display())))?;
        let reader = fedhcc_core::params::ValueReader::new(std::io::BufReader::with_capacity(64 * 1024, f))
            .map_err(|e| err(format!("{}: {e}", self.path.display())))?;
        if reader.layout().fingerprint() != layout.fingerprint() {
            return Err(err("layout differs from the global model".into()));
        }
        Ok(Box::new(SpoolBlocks { site: &self.site, path: &self.path, reader }))
    }
}

/// A spooled update being read block by block.
struct SpoolBlocks<'a> {
    site: &'a str,
    path: &'a Path,
    reader: fedhcc_core::params::ValueReader<std::io::BufReader<std::fs::File>>,
}

impl SpoolBlocks<'_> {
    fn error(&self, e: fedhcc_core::params::ParamsError) -> StrategyError {
        StrategyError::Update { site: self.site.into(), message: format!("{}: {e}", self.path.display()) }
    }
}

impl UpdateBlocks for SpoolBlocks<'_> {
    fn read_block(&mut self, out: &mut [f32]) -> Result<(), StrategyError> {
        self.reader.read(out).map_err(|e| self.error(e))
    }
    fn finish(self: Box<Self>) -> Result<(), StrategyError> {
        let SpoolBlocks { site, path, reader } = *self;
        reader
            .finish()
            .map_err(|e| StrategyError::Update { site: site.into(), message: format!("{}: {e}", path.display()) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::strategy::{self, Median, Strategy};
    use fedhcc_core::params::ParameterSet;
    use std::collections::BTreeMap;

    fn ps(v: Vec<f32>) -> ParameterSet {
        ParameterSet::from_tensors(vec![("w".into(), vec![v.len()], v)]).unwrap()
    }

    #[test]
    fn every_answer_has_its_own_name_in_its_tasks_folder() {
        let s = Spool::at("/state/spool");
        assert_eq!(s.answer("r1a1", "a", Answer::Update), Path::new("/state/spool/r1a1/a.upd"));
        assert_eq!(s.answer("r1a1", "a", Answer::Masked), Path::new("/state/spool/r1a1/a.msk"));
        assert_eq!(s.answer("r1a1", "a", Answer::Statistics), Path::new("/state/spool/r1a1/a.stats"));
        let slot = s.slot("r1a1", "a", Answer::Masked);
        assert_eq!(slot.part("x1"), Path::new("/state/spool/r1a1/a.x1.part"));
        assert_eq!((slot.dir(), slot.fin()), (Path::new("/state/spool/r1a1"), Path::new("/state/spool/r1a1/a.msk")));
    }

    #[tokio::test]
    async fn fresh_empties_what_a_previous_run_left_and_discard_removes_a_task() {
        let tmp = tempfile::tempdir().unwrap();
        let old = Spool::at(tmp.path().join("spool")).answer("r1a1", "a", Answer::Update);
        std::fs::create_dir_all(old.parent().unwrap()).unwrap();
        std::fs::write(&old, b"left over").unwrap();
        let s = Spool::fresh(tmp.path()).unwrap();
        assert!(!old.exists() && tmp.path().join("spool").is_dir());
        let f = s.answer("r2a1", "b", Answer::Masked);
        std::fs::create_dir_all(f.parent().unwrap()).unwrap();
        std::fs::write(&f, b"x").unwrap();
        s.discard("r2a1").await;
        assert!(!s.task_dir("r2a1").exists());
    }

    #[test]
    fn spooled_updates_are_read_block_wise_and_a_damaged_one_is_named() {
        let tmp = tempfile::tempdir().unwrap();
        let n = strategy::BLOCK_VALUES + 5;
        let write = |name: &str, k: f32| {
            let p = tmp.path().join(name);
            std::fs::write(&p, ps((0..n).map(|i| i as f32 * k).collect()).encode()).unwrap();
            p
        };
        let mut files = [
            SpooledUpdate { site: "a".into(), samples: 1, path: write("a.upd", 1.0) },
            SpooledUpdate { site: "b".into(), samples: 1, path: write("b.upd", 5.0) },
            SpooledUpdate { site: "c".into(), samples: 1, path: write("c.upd", 2.0) },
        ];
        let mut refs: Vec<&mut dyn UpdateSource> = files.iter_mut().map(|f| f as &mut dyn UpdateSource).collect();
        let out = Median.aggregate(ps(vec![1.0; n]), &mut refs, &BTreeMap::new()).unwrap();
        assert!(out.values().iter().enumerate().all(|(i, &v)| v == 1.0 + i as f32 * 2.0));

        let bytes = std::fs::read(&files[1].path).unwrap();
        std::fs::write(&files[1].path, &bytes[..bytes.len() - 4]).unwrap();
        let mut refs: Vec<&mut dyn UpdateSource> = files.iter_mut().map(|f| f as &mut dyn UpdateSource).collect();
        let e = Median.aggregate(ps(vec![1.0; n]), &mut refs, &BTreeMap::new()).unwrap_err().to_string();
        assert!(e.contains("site b") && e.contains("b.upd"), "{e}");
        let mut refs: Vec<&mut dyn UpdateSource> = files.iter_mut().map(|f| f as &mut dyn UpdateSource).collect();
        let e = Median.aggregate(ps(vec![1.0; 3]), &mut refs, &BTreeMap::new()).unwrap_err().to_string();
        assert!(e.contains("layout differs"), "{e}");
    }
}
