//! The task attempts a run has announced (`meta` key `attempts:<run>`: the highest attempt number),
//! recorded before each announcement, so that a restarted server numbers its tasks after every one
//! announced before it: a task id (`r3a7`) names one announcement in the whole run, never two, and
//! an answer computed for a task announced before a restart is refused as stale rather than taken
//! for a new task that would otherwise carry the same id.

use super::{Store, StoreError};
use rusqlite::{OptionalExtension, params};

impl Store {
    fn attempts_key(&self) -> String {
        format!("attempts:{}", self.run_id)
    }

    /// The highest task attempt this run has announced (0: none yet).
    ///
    /// # Errors
    /// Database failure, or a recorded value that is not an attempt number.
    pub fn attempts_announced(&self) -> Result<u32, StoreError> {
        let key = self.attempts_key();
        let value: Option<String> = self
            .conn
            .query_row("SELECT value FROM meta WHERE key = ?1", params![key], |r| r.get(0))
            .optional()
            .map_err(self.db())?;
        match value {
            None => Ok(0),
            Some(v) => v.parse().map_err(|_| {
                StoreError::Inconsistent(format!(
                    "{}: meta '{key}' is '{v}', not a task attempt number (0 to {}); the database was altered",
                    self.db_path.display(),
                    u32::MAX
                ))
            }),
        }
    }

    /// Records that attempt `attempt` of this run is being announced. A number at or below the one
    /// recorded changes nothing, so the record only ever grows.
    ///
    /// # Errors
    /// Database failure; nothing is recorded then.
    pub fn record_attempt_announced(&self, attempt: u32) -> Result<(), StoreError> {
        if attempt <= self.attempts_announced()? {
            return Ok(());
        }
        self.conn
            .execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES (?1, ?2)",
                params![self.attempts_key(), attempt.to_string()],
            )
            .map(drop)
            .map_err(self.db())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_announced_attempt_only_grows_is_kept_per_run_and_an_altered_value_is_named() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path(), "run-1").unwrap();
            assert_eq!(s.attempts_announced().unwrap(), 0, "a fresh run has announced nothing");
            s.record_attempt_announced(3).unwrap();
            s.record_attempt_announced(2).unwrap();
            assert_eq!(s.attempts_announced().unwrap(), 3, "never lowered");
            s.record_attempt_announced(7).unwrap();
        }
        let s = Store::open(dir.path(), "run-1").unwrap();
        assert_eq!(s.attempts_announced().unwrap(), 7, "kept across a reopen (a restart)");
        assert_eq!(Store::open(dir.path(), "run-2").unwrap().attempts_announced().unwrap(), 0, "per run");
        s.conn.execute("UPDATE meta SET value = 'x' WHERE key = 'attempts:run-1'", []).unwrap();
        let e = s.attempts_announced().unwrap_err().to_string();
        assert!(e.contains("server.db") && e.contains("attempts:run-1") && e.contains("'x'"), "{e}");
    }
}
