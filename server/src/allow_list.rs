//! The sites that may join: the server configuration's `allowed_sites`, changed while the server
//! runs by the study lead (`fedhcc admin allow SITE` / `disallow SITE`). Changes are persisted in
//! the server database (`store::admin`) and applied over the configured list at every start, so a
//! removed site stays removed after a restart until it is allowed again.
//!
//! Read by every request handler (a std `RwLock`, held for a lookup or a copy only).

use std::collections::BTreeSet;
use std::sync::RwLock;

/// The current allow-list and the sites the study lead removed from it.
#[derive(Debug, Default)]
pub struct AllowList {
    inner: RwLock<Lists>,
}

#[derive(Clone, Debug, Default)]
struct Lists {
    allowed: BTreeSet<String>,
    /// Removed by an admin command (and not allowed again since).
    removed: BTreeSet<String>,
}

impl AllowList {
    /// The configured sites with the recorded changes applied in order: `(site, allowed)`.
    pub fn new(configured: impl IntoIterator<Item = String>, changes: &[(String, bool)]) -> Self {
        let list: AllowList = configured.into_iter().collect();
        for (site, allowed) in changes {
            list.set(site, *allowed);
        }
        list
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Lists> {
        self.inner.read().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether `site` may join now.
    pub fn contains(&self, site: &str) -> bool {
        self.read().allowed.contains(site)
    }

    /// How many sites may join.
    pub fn len(&self) -> usize {
        self.read().allowed.len()
    }

    /// Whether no site may join.
    pub fn is_empty(&self) -> bool {
        self.read().allowed.is_empty()
    }

    /// The sites that may join, in id order.
    pub fn sites(&self) -> Vec<String> {
        self.read().allowed.iter().cloned().collect()
    }

    /// The sites the study lead removed (and has not allowed again), in id order.
    pub fn removed(&self) -> Vec<String> {
        self.read().removed.iter().cloned().collect()
    }

    /// Allows or removes `site`; returns whether that changed anything.
    pub fn set(&self, site: &str, allowed: bool) -> bool {
        let mut g = self.inner.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        if allowed {
            g.removed.remove(site);
            g.allowed.insert(site.to_string())
        } else {
            let changed = g.allowed.remove(site);
            g.removed.insert(site.to_string());
            changed
        }
    }
}

impl FromIterator<String> for AllowList {
    fn from_iter<I: IntoIterator<Item = String>>(iter: I) -> Self {
        Self { inner: RwLock::new(Lists { allowed: iter.into_iter().collect(), removed: BTreeSet::new() }) }
    }
}

impl<const N: usize> From<[String; N]> for AllowList {
    fn from(sites: [String; N]) -> Self {
        sites.into_iter().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorded_changes_apply_over_the_configured_sites_in_order() {
        let changes = [("b".to_string(), false), ("z".to_string(), true), ("b".to_string(), true), ("a".into(), false)];
        let l = AllowList::new(["a".to_string(), "b".to_string()], &changes);
        assert_eq!(l.sites(), ["b", "z"]);
        assert_eq!(l.removed(), ["a"]);
        assert!(!l.contains("a") && l.contains("z"));
        assert!(!l.set("z", true), "already allowed");
        assert!(l.set("z", false));
        assert!(!l.set("z", false), "already removed");
        assert_eq!((l.len(), l.removed()), (1, vec!["a".to_string(), "z".to_string()]));
        assert!(l.set("a", true));
        assert_eq!(l.removed(), ["z"]);
    }
}
