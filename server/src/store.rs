//! Durable server state: an embedded SQLite database (round records, evaluations, run identity)
//! and the checkpoint files it points to.
//!
//! Invariant: a round exists in the `rounds` table only once its checkpoint file is fully written,
//! fsynced and renamed into place, and its SHA-256 is recorded with it. On restart the server
//! resumes from the newest round whose checkpoint verifies.

use fedhcc_core::params::{ParameterSet, sha256_hex};
use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

mod admin;
pub use admin::AdminActionRecord;
mod attempts;

/// A failure of the database or checkpoint files.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database {path}: {source}")]
    Db { path: PathBuf, source: rusqlite::Error },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{0}")]
    Inconsistent(String),
}

/// What is recorded for every committed round.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RoundRecord {
    pub round: u32,
    pub attempt: u32,
    pub task_id: String,
    pub participants: Vec<String>,
    pub samples: Vec<u64>,
    /// Mean training loss reported by each participant (same order), NaN-free.
    pub losses: Vec<Option<f64>>,
    pub failures: Vec<(String, String)>,
    pub duration_s: f64,
    pub aggregate_s: f64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub checkpoint: String,
    pub checkpoint_sha256: String,
    pub committed_unix: i64,
    /// The strategy's carried state after this round (server optimizer moments), written like a
    /// checkpoint and committed with the round; absent for stateless strategies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strategy_state: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strategy_state_sha256: Option<String>,
    /// The round's update was securely aggregated: the server decoded only the sum of the sites'
    /// masked updates (`samples` were sent in the clear).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub secure_aggregation: bool,
    /// Under differential privacy: ε (for the study's δ) after this round.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epsilon: Option<f64>,
}

/// One site's evaluation report (aggregate metrics, and the site's checked evaluation summary).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct EvaluationRecord {
    pub round: u32,
    pub task_id: String,
    pub site: String,
    pub samples: u64,
    pub metrics: Vec<(String, f64)>,
    /// The site's summary (`crate::evaluation`); absent in records from before summaries existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<fedhcc_stats::federated::SiteEvaluation>,
}

/// The server's database and checkpoint directory.
pub struct Store {
    conn: Connection,
    db_path: PathBuf,
    checkpoints: PathBuf,
    run_id: String,
}

impl Store {
    /// Opens (creating if needed) `state_dir/server.db` and `state_dir/checkpoints/`.
    ///
    /// # Errors
    /// The folder or database cannot be created or opened.
    pub fn open(state_dir: &Path, run_id: &str) -> Result<Self, StoreError> {
        let checkpoints = state_dir.join("checkpoints");
        fs::create_dir_all(&checkpoints).map_err(|source| StoreError::Io { path: checkpoints.clone(), source })?;
        let db_path = state_dir.join("server.db");
        let db = |source| StoreError::Db { path: db_path.clone(), source };
        let conn = Connection::open(&db_path).map_err(db)?;
        conn.execute_batch(
            "PRAGMA journal_mode=WAL;
             PRAGMA synchronous=FULL;
             PRAGMA foreign_keys=ON;
             CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS rounds (
                run_id TEXT NOT NULL, round INTEGER NOT NULL, record TEXT NOT NULL,
                checkpoint TEXT NOT NULL, checkpoint_sha256 TEXT NOT NULL,
                PRIMARY KEY (run_id, round));
             CREATE TABLE IF NOT EXISTS evaluations (
                run_id TEXT NOT NULL, round INTEGER NOT NULL, site TEXT NOT NULL, task_id TEXT NOT NULL,
                record TEXT NOT NULL, PRIMARY KEY (run_id, round, site));",
        )
        .map_err(|source| StoreError::Db { path: db_path.clone(), source })?;
        Ok(Self { conn, db_path, checkpoints, run_id: run_id.to_string() })
    }

    /// Opens an existing `state_dir/server.db` for reading only (reports, tools): creates no file,
    /// folder or table, and never writes, so it is safe beside a running server.
    ///
    /// # Errors
    /// There is no `server.db` in `state_dir`, or it cannot be opened or is not a server database.
    pub fn open_read_only(state_dir: &Path, run_id: &str) -> Result<Self, StoreError> {
        use rusqlite::OpenFlags;
        let db_path = state_dir.join("server.db");
        if !db_path.is_file() {
            return Err(StoreError::Inconsistent(format!(
                "{} has no server.db: it is not a fedhcc server's state folder (the state_dir of server.toml)",
                state_dir.display()
            )));
        }
        let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = Connection::open_with_flags(&db_path, flags)
            .map_err(|source| StoreError::Db { path: db_path.clone(), source })?;
        let store = Self { conn, db_path, checkpoints: state_dir.join("checkpoints"), run_id: run_id.to_string() };
        let tables: i64 = store
            .conn
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name IN ('meta', 'rounds', 'evaluations')",
                [],
                |r| r.get(0),
            )
            .map_err(store.db())?;
        if tables != 3 {
            return Err(StoreError::Inconsistent(format!(
                "{} is not a fedhcc server database (its tables are missing)",
                store.db_path.display()
            )));
        }
        Ok(store)
    }

    /// The run ids this database holds (with a recorded identity or a committed round), sorted.
    ///
    /// # Errors
    /// Database failure.
    pub fn run_ids(&self) -> Result<Vec<String>, StoreError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT substr(key, 13) FROM meta WHERE key LIKE 'fingerprint:%' UNION SELECT run_id FROM rounds \
                 ORDER BY 1",
            )
            .map_err(self.db())?;
        let rows = stmt.query_map([], |r| r.get::<_, String>(0)).map_err(self.db())?;
        rows.collect::<Result<Vec<_>, _>>().map_err(self.db())
    }

    /// The run this store reads and writes.
    pub fn run_id(&self) -> &str {
        &self.run_id
    }

    /// The study id and this run's model layout fingerprint, as recorded at the run's first start
    /// (`None` where not recorded).
    ///
    /// # Errors
    /// Database failure.
    pub fn identity(&self) -> Result<(Option<String>, Option<String>), StoreError> {
        let get = |key: &str| {
            self.conn
                .query_row("SELECT value FROM meta WHERE key = ?1", params![key], |r| r.get::<_, String>(0))
                .optional()
                .map_err(self.db())
        };
        Ok((get("study_id")?, get(&format!("fingerprint:{}", self.run_id))?))
    }

    fn db(&self) -> impl FnOnce(rusqlite::Error) -> StoreError + '_ {
        move |source| StoreError::Db { path: self.db_path.clone(), source }
    }

    /// Records the run's identity the first time and checks it on every later start, so a state
    /// folder is never silently reused for another study or model.
    ///
    /// # Errors
    /// The folder holds another study, run or model layout.
    pub fn check_identity(&self, study: &str, fingerprint: &str) -> Result<(), StoreError> {
        let fingerprint_key = format!("fingerprint:{}", self.run_id);
        for (key, want) in [("study_id", study), (fingerprint_key.as_str(), fingerprint)] {
            if let Some(h) = self.record_or_read(key, want)? {
                return Err(StoreError::Inconsistent(format!(
                    "{} belongs to {key} = {h}, but this configuration has {want}; use another state_dir or run_id",
                    self.db_path.display()
                )));
            }
        }
        Ok(())
    }

    /// Records the run's aggregation strategy (with its settings) the first time and checks it on
    /// every later start: a run keeps one strategy, since a server optimizer's state and a FedBN
    /// model layout only make sense under the strategy that made them.
    ///
    /// # Errors
    /// The folder's run was made with another strategy or other settings.
    pub fn check_strategy(&self, description: &str) -> Result<(), StoreError> {
        match self.record_or_read(&format!("strategy:{}", self.run_id), description)? {
            None => Ok(()),
            Some(h) => Err(StoreError::Inconsistent(format!(
                "{}: run {} was started with strategy {h}, but this configuration asks for {description}; a run \
                 keeps its strategy: restore the original [federation] settings or use another run_id",
                self.db_path.display(),
                self.run_id
            ))),
        }
    }

    /// Records the run's secure aggregation and DP settings (`description`, e.g.
    /// `secagg(clip=1, scale=2^37) + dp(σ=1, C=1, δ=1e-5)`) the first time and checks them on every
    /// later start: ε is accounted from round 1 under one mechanism, and a run must not resume in the
    /// clear after it promised its sites masking.
    ///
    /// # Errors
    /// The folder's run was made with other privacy settings.
    pub fn check_privacy(&self, description: &str) -> Result<(), StoreError> {
        match self.record_or_read(&format!("privacy:{}", self.run_id), description)? {
            None => Ok(()),
            Some(h) => Err(StoreError::Inconsistent(format!(
                "{}: run {} was started with privacy settings {h}, but this configuration has {description}; a run \
                 keeps its secure aggregation and differential privacy settings (ε counts from round 1): restore \
                 the original [federation] settings or use another run_id",
                self.db_path.display(),
                self.run_id
            ))),
        }
    }

    /// Stores `want` under `key` if the key is new; otherwise returns the stored value when it differs.
    fn record_or_read(&self, key: &str, want: &str) -> Result<Option<String>, StoreError> {
        let have: Option<String> = self
            .conn
            .query_row("SELECT value FROM meta WHERE key = ?1", params![key], |r| r.get(0))
            .optional()
            .map_err(self.db())?;
        match have {
            None => {
                self.conn
                    .execute("INSERT INTO meta (key, value) VALUES (?1, ?2)", params![key, want])
                    .map_err(self.db())?;
                Ok(None)
            }
            Some(h) if h == want => Ok(None),
            Some(h) => Ok(Some(h)),
        }
    }

    /// Committed rounds of this run, oldest first.
    ///
    /// # Errors
    /// Database failure or an unreadable record.
    pub fn rounds(&self) -> Result<Vec<RoundRecord>, StoreError> {
        self.records("SELECT record FROM rounds WHERE run_id = ?1 ORDER BY round", "round record")
    }

    /// Evaluation reports of this run.
    ///
    /// # Errors
    /// Database failure or an unreadable record.
    pub fn evaluations(&self) -> Result<Vec<EvaluationRecord>, StoreError> {
        self.records("SELECT record FROM evaluations WHERE run_id = ?1 ORDER BY round, site", "evaluation record")
    }

    fn records<T: serde::de::DeserializeOwned>(&self, sql: &str, what: &str) -> Result<Vec<T>, StoreError> {
        let mut stmt = self.conn.prepare(sql).map_err(self.db())?;
        let rows = stmt
            .query_map(params![self.run_id], |r| r.get::<_, String>(0))
            .map_err(self.db())?
            .collect::<Result<Vec<_>, _>>()
            .map_err(self.db())?;
        rows.iter()
            .map(|t| serde_json::from_str(t).map_err(|e| StoreError::Inconsistent(format!("{what}: {e}"))))
            .collect()
    }

    /// Path of the checkpoint file for `round`.
    pub fn checkpoint_path(&self, round: u32) -> PathBuf {
        self.checkpoints.join(format!("{}-round-{round:05}.fhcp", self.run_id))
    }

    /// Path of the strategy-state file saved with `round`.
    pub fn strategy_state_path(&self, round: u32) -> PathBuf {
        self.checkpoints.join(format!("{}-round-{round:05}.state.fhcp", self.run_id))
    }

    /// Writes a checkpoint atomically: temp file, fsync, rename, fsync of the folder. The payload is
    /// streamed (no second copy of the model in memory) and hashed on the way.
    /// Returns its path, SHA-256 and length.
    ///
    /// # Errors
    /// Any I/O failure; no partial file is left under the final name.
    pub fn write_checkpoint(&self, round: u32, params: &ParameterSet) -> Result<(PathBuf, String, u64), StoreError> {
        self.write_payload(self.checkpoint_path(round), params)
    }

    /// Writes the strategy's state after `round` the way checkpoints are written (atomic, hashed);
    /// it counts only once the round record naming it is committed.
    ///
    /// # Errors
    /// Any I/O failure; no partial file is left under the final name.
    pub fn write_strategy_state(&self, round: u32, state: &ParameterSet) -> Result<(PathBuf, String, u64), StoreError> {
        self.write_payload(self.strategy_state_path(round), state)
    }

    /// Reads and verifies the strategy state a committed round recorded, if it recorded one.
    ///
    /// # Errors
    /// A missing or altered file, or one that is not a parameter set.
    pub fn read_strategy_state(&self, rec: &RoundRecord) -> Result<Option<ParameterSet>, StoreError> {
        let (Some(path), Some(sha)) = (&rec.strategy_state, &rec.strategy_state_sha256) else {
            return Ok(None);
        };
        let path = Path::new(path);
        let bytes = self.read_checkpoint(path, sha)?;
        ParameterSet::decode(&bytes)
            .map(Some)
            .map_err(|e| StoreError::Inconsistent(format!("strategy state {}: {e}", path.display())))
    }

    fn write_payload(&self, path: PathBuf, params: &ParameterSet) -> Result<(PathBuf, String, u64), StoreError> {
        let tmp = path.with_extension("fhcp.tmp");
        let result = (|| {
            let f = fs::File::create(&tmp)?;
            let mut w =
                HashingWriter { inner: std::io::BufWriter::with_capacity(1 << 20, f), hasher: Sha256::new(), len: 0 };
            params.write_to(&mut w)?;
            let HashingWriter { inner, hasher, len } = w;
            let f = inner.into_inner().map_err(|e| e.into_error())?;
            f.sync_all()?;
            fs::rename(&tmp, &path)?;
            fs::File::open(&self.checkpoints)?.sync_all()?;
            Ok::<_, std::io::Error>((hex::encode(hasher.finalize()), len))
        })();
        match result {
            Ok((sha, len)) => Ok((path, sha, len)),
            Err(source) => {
                let _ = fs::remove_file(&tmp);
                Err(StoreError::Io { path, source })
            }
        }
    }

    /// Reads a checkpoint and verifies its SHA-256.
    ///
    /// # Errors
    /// Missing file or a hash mismatch (the file was altered or damaged).
    pub fn read_checkpoint(&self, path: &Path, sha256: &str) -> Result<Vec<u8>, StoreError> {
        let bytes = fs::read(path).map_err(|source| StoreError::Io { path: path.to_path_buf(), source })?;
        let got = sha256_hex(&bytes);
        if got != sha256 {
            return Err(StoreError::Inconsistent(format!(
                "checkpoint {} has SHA-256 {got}, but the database recorded {sha256}: the file was altered or damaged",
                path.display()
            )));
        }
        Ok(bytes)
    }

    /// Records a committed round (after its checkpoint is on disk).
    ///
    /// # Errors
    /// Database failure; the round is then not committed.
    pub fn commit_round(&mut self, rec: &RoundRecord) -> Result<(), StoreError> {
        let text = serde_json::to_string(rec).map_err(|e| StoreError::Inconsistent(e.to_string()))?;
        let tx = self.conn.transaction().map_err(|source| StoreError::Db { path: self.db_path.clone(), source })?;
        tx.execute(
            "INSERT INTO rounds (run_id, round, record, checkpoint, checkpoint_sha256) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![self.run_id, rec.round, text, rec.checkpoint, rec.checkpoint_sha256],
        )
        .map_err(|source| StoreError::Db { path: self.db_path.clone(), source })?;
        tx.commit().map_err(|source| StoreError::Db { path: self.db_path.clone(), source })
    }

    /// Records an evaluation report (replacing an earlier one from the same site for that round).
    ///
    /// # Errors
    /// Database failure.
    pub fn record_evaluation(&self, rec: &EvaluationRecord) -> Result<(), StoreError> {
        let text = serde_json::to_string(rec).map_err(|e| StoreError::Inconsistent(e.to_string()))?;
        self.conn
            .execute(
                "INSERT OR REPLACE INTO evaluations (run_id, round, site, task_id, record) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![self.run_id, rec.round, rec.site, rec.task_id, text],
            )
            .map_err(self.db())?;
        Ok(())
    }

    /// Deletes checkpoints older than the newest `keep` (the initial model, round 0, is kept).
    pub fn prune_checkpoints(&self, newest: u32, keep: usize) {
        let keep = keep.max(1) as u32;
        if newest < keep {
            return;
        }
        for r in 1..=newest.saturating_sub(keep) {
            for p in [self.checkpoint_path(r), self.strategy_state_path(r)] {
                if p.exists()
                    && let Err(e) = fs::remove_file(&p)
                {
                    tracing::warn!(path = %p.display(), error = %e, "could not remove an old checkpoint");
                }
            }
        }
    }
}

struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    len: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoint_round_trip_and_tamper_detection() {
        let tmp = tempfile::tempdir().unwrap();
        let mut s = Store::open(tmp.path(), "run-1").unwrap();
        s.check_identity("study", "fp1").unwrap();
        let p = ParameterSet::from_tensors(vec![("w".into(), vec![2], vec![1.0, 2.0])]).unwrap();
        let (path, sha, len) = s.write_checkpoint(1, &p).unwrap();
        assert_eq!(len as usize, p.layout().payload_len());
        assert_eq!(s.read_checkpoint(&path, &sha).unwrap(), p.encode());
        assert_eq!(sha, sha256_hex(&p.encode()));
        fs::write(&path, b"hellp").unwrap();
        assert!(s.read_checkpoint(&path, &sha).unwrap_err().to_string().contains("altered"));
        let rec = RoundRecord {
            round: 1,
            attempt: 1,
            task_id: "r1a1".into(),
            participants: vec!["a".into()],
            samples: vec![3],
            losses: vec![Some(0.5)],
            failures: vec![],
            duration_s: 1.0,
            aggregate_s: 0.1,
            bytes_in: 5,
            bytes_out: 5,
            checkpoint: path.display().to_string(),
            checkpoint_sha256: sha,
            committed_unix: 0,
            strategy_state: None,
            strategy_state_sha256: None,
            secure_aggregation: true,
            epsilon: Some(1.5),
        };
        s.commit_round(&rec).unwrap();
        assert!(s.commit_round(&rec).is_err(), "a round is committed once");
        drop(s);
        let s = Store::open(tmp.path(), "run-1").unwrap();
        assert_eq!(s.rounds().unwrap(), vec![rec]);
        assert!(s.check_identity("study", "fp2").unwrap_err().to_string().contains("fingerprint"));
        assert!(s.check_identity("other", "fp1").is_err());
    }

    #[test]
    fn read_only_open_creates_nothing_and_reads_runs_and_identity() {
        let tmp = tempfile::tempdir().unwrap();
        let missing = Store::open_read_only(tmp.path(), "run-1").err().unwrap().to_string();
        assert!(missing.contains("no server.db"), "{missing}");
        assert_eq!(fs::read_dir(tmp.path()).unwrap().count(), 0, "nothing created");
        fs::write(tmp.path().join("server.db"), b"").unwrap();
        let empty = Store::open_read_only(tmp.path(), "run-1").err().unwrap().to_string();
        assert!(empty.contains("not a fedhcc server database"), "{empty}");
        fs::remove_file(tmp.path().join("server.db")).unwrap();
        let s = Store::open(tmp.path(), "run-b").unwrap();
        s.check_identity("study", "fp-b").unwrap();
        drop(s);
        let s = Store::open(tmp.path(), "run-a").unwrap();
        s.check_identity("study", "fp-a").unwrap();
        drop(s);
        let r = Store::open_read_only(tmp.path(), "run-a").unwrap();
        assert_eq!(r.run_ids().unwrap(), vec!["run-a".to_string(), "run-b".to_string()]);
        assert_eq!(r.identity().unwrap(), (Some("study".into()), Some("fp-a".into())));
        assert!(
            r.record_evaluation(&EvaluationRecord {
                round: 1,
                task_id: "e1a1".into(),
                site: "a".into(),
                samples: 1,
                metrics: vec![],
                summary: None,
            })
            .is_err()
        );
    }

    #[test]
    fn strategy_state_is_hashed_verified_and_pruned_and_the_strategy_is_kept_per_run() {
        let tmp = tempfile::tempdir().unwrap();
        let s = Store::open(tmp.path(), "run-1").unwrap();
        s.check_strategy("fedadam(lr=0.01)").unwrap();
        s.check_strategy("fedadam(lr=0.01)").unwrap();
        let e = s.check_strategy("fedavg").unwrap_err().to_string();
        assert!(e.contains("fedadam(lr=0.01)") && e.contains("fedavg") && e.contains("run_id"), "{e}");
        s.check_privacy("secagg").unwrap();
        s.check_privacy("secagg").unwrap();
        let e = s.check_privacy("none").unwrap_err().to_string();
        assert!(e.contains("secagg") && e.contains("none") && e.contains("ε counts from round 1"), "{e}");
        let state = ParameterSet::from_tensors(vec![("m".into(), vec![2], vec![0.5, -0.5])]).unwrap();
        let (path, sha, _) = s.write_strategy_state(4, &state).unwrap();
        assert_eq!(path, s.strategy_state_path(4));
        let mut rec: RoundRecord = serde_json::from_str(
            r#"{"round":4,"attempt":1,"task_id":"r4a1","participants":[],"samples":[],"losses":[],"failures":[],
                "duration_s":0,"aggregate_s":0,"bytes_in":0,"bytes_out":0,"checkpoint":"c","checkpoint_sha256":"x",
                "committed_unix":0}"#,
        )
        .unwrap();
        assert_eq!(s.read_strategy_state(&rec).unwrap(), None, "records from before strategy state still read");
        rec.strategy_state = Some(path.display().to_string());
        rec.strategy_state_sha256 = Some(sha);
        assert_eq!(s.read_strategy_state(&rec).unwrap(), Some(state));
        fs::write(&path, b"changed").unwrap();
        assert!(s.read_strategy_state(&rec).unwrap_err().to_string().contains("altered"));
        s.prune_checkpoints(6, 2);
        assert!(!path.exists(), "old state files go with their checkpoints");
    }
}
