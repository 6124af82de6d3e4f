//! The study lead's decisions, kept in the server database so they outlive a restart: the run's
//! control state (`meta` key `control:<run>`: awaiting_start, running, paused, aborted), the
//! allow-list changes (`site_access`, for the whole state folder: a removed site stays removed in
//! every run until it is allowed again), and the log of admin actions (`admin_actions`: who, what,
//! when; never a patient-level value). A change and its log line are written in one transaction.

use super::{Store, StoreError};
use rusqlite::{OptionalExtension, params};
use serde::Serialize;

/// One admin action as recorded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AdminActionRecord {
    pub unix: i64,
    /// The admin certificate's name.
    pub admin: String,
    /// `start`, `pause`, `resume`, `abort`, `allow`, `disallow` or `export`.
    pub action: String,
    pub detail: String,
}

impl Store {
    /// Creates the admin tables if they are missing (the server calls it at start).
    ///
    /// # Errors
    /// Database failure.
    pub fn init_admin(&self) -> Result<(), StoreError> {
        self.conn
            .execute_batch(
                "CREATE TABLE IF NOT EXISTS site_access (
                    site TEXT PRIMARY KEY, allowed INTEGER NOT NULL, changed_unix INTEGER NOT NULL,
                    admin TEXT NOT NULL);
                 CREATE TABLE IF NOT EXISTS admin_actions (
                    seq INTEGER PRIMARY KEY AUTOINCREMENT, run_id TEXT NOT NULL, unix INTEGER NOT NULL,
                    admin TEXT NOT NULL, action TEXT NOT NULL, detail TEXT NOT NULL);",
            )
            .map_err(self.db())
    }

    fn control_key(&self) -> String {
        format!("control:{}", self.run_id)
    }

    /// This run's control state as last recorded (`None`: never changed by the study lead).
    ///
    /// # Errors
    /// Database failure.
    pub fn run_control(&self) -> Result<Option<String>, StoreError> {
        self.conn
            .query_row("SELECT value FROM meta WHERE key = ?1", params![self.control_key()], |r| r.get(0))
            .optional()
            .map_err(self.db())
    }

    /// Records this run's new control state with the action that set it, in one transaction.
    ///
    /// # Errors
    /// Database failure; nothing is recorded then.
    pub fn record_run_control(&mut self, value: &str, action: &AdminActionRecord) -> Result<(), StoreError> {
        let key = self.control_key();
        let run = self.run_id.clone();
        let tx = self.conn.transaction().map_err(|source| StoreError::Db { path: self.db_path.clone(), source })?;
        let result = tx
            .execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?1, ?2)", params![key, value])
            .and_then(|_| insert_action(&tx, &run, action))
            .and_then(|()| tx.commit());
        result.map_err(|source| StoreError::Db { path: self.db_path.clone(), source })
    }

    /// The allow-list changes the study lead made: (site, allowed), by site id.
    ///
    /// # Errors
    /// Database failure.
    pub fn site_access(&self) -> Result<Vec<(String, bool)>, StoreError> {
        let mut stmt = self.conn.prepare("SELECT site, allowed FROM site_access ORDER BY site").map_err(self.db())?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? != 0))).map_err(self.db())?;
        rows.collect::<Result<Vec<_>, _>>().map_err(self.db())
    }

    /// Records that `site` is now allowed (or not), with the action, in one transaction.
    ///
    /// # Errors
    /// Database failure; nothing is recorded then.
    pub fn record_site_access(
        &mut self,
        site: &str,
        allowed: bool,
        action: &AdminActionRecord,
    ) -> Result<(), StoreError> {
        let run = self.run_id.clone();
        let tx = self.conn.transaction().map_err(|source| StoreError::Db { path: self.db_path.clone(), source })?;
        let result = tx
            .execute(
                "INSERT OR REPLACE INTO site_access (site, allowed, changed_unix, admin) VALUES (?1, ?2, ?3, ?4)",
                params![site, i64::from(allowed), action.unix, action.admin],
            )
            .and_then(|_| insert_action(&tx, &run, action))
            .and_then(|()| tx.commit());
        result.map_err(|source| StoreError::Db { path: self.db_path.clone(), source })
    }

    /// Records an admin action that changes nothing durable (an export).
    ///
    /// # Errors
    /// Database failure.
    pub fn record_admin_action(&self, action: &AdminActionRecord) -> Result<(), StoreError> {
        insert_action(&self.conn, &self.run_id, action).map_err(self.db())
    }

    /// This run's most recent `limit` admin actions, oldest first.
    ///
    /// # Errors
    /// Database failure.
    pub fn admin_actions(&self, limit: usize) -> Result<Vec<AdminActionRecord>, StoreError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT unix, admin, action, detail FROM (SELECT * FROM admin_actions WHERE run_id = ?1 \
                 ORDER BY seq DESC LIMIT ?2) ORDER BY seq",
            )
            .map_err(self.db())?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = stmt
            .query_map(params![self.run_id, limit], |r| {
                Ok(AdminActionRecord { unix: r.get(0)?, admin: r.get(1)?, action: r.get(2)?, detail: r.get(3)? })
            })
            .map_err(self.db())?;
        rows.collect::<Result<Vec<_>, _>>().map_err(self.db())
    }
}

fn insert_action(conn: &rusqlite::Connection, run: &str, a: &AdminActionRecord) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO admin_actions (run_id, unix, admin, action, detail) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![run, a.unix, a.admin, a.action, a.detail],
    )
    .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn action(what: &str, detail: &str) -> AdminActionRecord {
        AdminActionRecord { unix: 7, admin: "lead".into(), action: what.into(), detail: detail.into() }
    }

    #[test]
    fn control_state_allow_list_and_actions_outlive_a_reopen_and_stay_per_run() {
        let tmp = tempfile::tempdir().unwrap();
        {
            let mut s = Store::open(tmp.path(), "run-1").unwrap();
            s.init_admin().unwrap();
            assert_eq!(s.run_control().unwrap(), None);
            s.record_run_control("paused", &action("pause", "")).unwrap();
            s.record_run_control("running", &action("resume", "")).unwrap();
            s.record_site_access("c", false, &action("disallow", "c")).unwrap();
            s.record_site_access("d", true, &action("allow", "d")).unwrap();
            s.record_site_access("c", true, &action("allow", "c")).unwrap();
            s.record_site_access("c", false, &action("disallow", "c again")).unwrap();
            s.record_admin_action(&action("export", "round 0")).unwrap();
        }
        let s = Store::open(tmp.path(), "run-1").unwrap();
        s.init_admin().unwrap();
        assert_eq!(s.run_control().unwrap().as_deref(), Some("running"));
        assert_eq!(s.site_access().unwrap(), vec![("c".to_string(), false), ("d".to_string(), true)]);
        let all = s.admin_actions(100).unwrap();
        assert_eq!(
            all.iter().map(|a| a.action.as_str()).collect::<Vec<_>>(),
            ["pause", "resume", "disallow", "allow", "allow", "disallow", "export"]
        );
        let last2 = s.admin_actions(2).unwrap();
        assert_eq!(
            (last2[0].detail.as_str(), last2[1].detail.as_str()),
            ("c again", "round 0"),
            "newest, oldest first"
        );

        // Another run in the same folder: its own control state and log, the same allow-list.
        let other = Store::open(tmp.path(), "run-2").unwrap();
        assert_eq!(other.run_control().unwrap(), None);
        assert!(other.admin_actions(10).unwrap().is_empty());
        assert_eq!(other.site_access().unwrap().len(), 2);
    }
}
