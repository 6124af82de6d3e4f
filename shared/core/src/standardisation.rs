//! Federated standardisation: every site standardises its inputs with the same means and standard
//! deviations, computed from all sites' training data without any value leaving a site.
//!
//! Before the first round the server asks each site for per-feature **sums, sums of squares and
//! counts** of its training split ([`GroupSums`], one per input group: the clinical columns, the
//! slide patch features). It merges them in site order ([`GroupSums::merge`]) and writes the pooled
//! mean and standard deviation into the model itself, as the tensors
//! `standardise.<group>.mean` and `standardise.<group>.std`. The model therefore carries its own
//! standardisation: sites read it from the global model they download, an exported model takes it
//! along, and an external validation site uses the study's statistics, not its own.
//!
//! Those tensors are never trained: executors take them out before training ([`split`]) and put
//! them back unchanged ([`attach`]), so every update's delta is exactly zero there. In a freshly
//! initialised model their standard deviations are 0, which marks them *unset* ([`read`] → `None`).

use crate::params::{Layout, ParameterSet, ParamsError, TensorSpec};

/// Name prefix of the standardisation tensors.
pub const PREFIX: &str = "standardise.";

/// Most columns in one group (the protocol's limit).
pub const MAX_COLUMNS: usize = 4096;

/// The smallest non-zero count a site may report for a column: smaller cells are suppressed by
/// the site ([`GroupSums::suppress_below`]) and refused by the server, because a count of 1 would
/// reveal a patient's value.
pub const MIN_CELL: u64 = 5;

/// One site's (or the pooled) sufficient statistics of one input group. Counts are per column
/// because a column may be missing for some patients.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GroupSums {
    /// `clinical` or `wsi` (letters, digits and `_` only).
    pub group: String,
    pub columns: Vec<String>,
    pub sum: Vec<f64>,
    pub sum_sq: Vec<f64>,
    pub count: Vec<u64>,
}

/// Why statistics cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum StandardisationError {
    #[error("statistics group '{0}': {1}")]
    Invalid(String, String),
    #[error("statistics group '{group}' has columns {theirs:?} at one site and {ours:?} at another")]
    ColumnsDiffer { group: String, ours: Vec<String>, theirs: Vec<String> },
    #[error("the model has no standardisation tensors for group '{0}'")]
    UnknownGroup(String),
    #[error("the model's group '{group}' has {model} columns, the statistics {stats}")]
    WidthMismatch { group: String, model: usize, stats: usize },
    #[error(transparent)]
    Params(#[from] ParamsError),
}

fn valid_group(g: &str) -> bool {
    !g.is_empty() && g.len() <= 32 && g.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

impl GroupSums {
    /// An empty accumulator for `columns`.
    pub fn new(group: &str, columns: Vec<String>) -> Self {
        let n = columns.len();
        Self { group: group.into(), columns, sum: vec![0.0; n], sum_sq: vec![0.0; n], count: vec![0; n] }
    }

    /// Adds one observed value of column `k`.
    pub fn add(&mut self, k: usize, x: f64) {
        self.sum[k] += x;
        self.sum_sq[k] += x * x;
        self.count[k] += 1;
    }

    /// Checks shape and finiteness (what the server checks on arrival).
    ///
    /// # Errors
    /// Unequal lengths, too many columns, a bad group name, a non-finite sum, or a negative sum
    /// of squares.
    pub fn check(&self) -> Result<(), StandardisationError> {
        let bad = |why: String| Err(StandardisationError::Invalid(self.group.clone(), why));
        if !valid_group(&self.group) {
            return bad("the group name must be 1–32 letters, digits or '_'".into());
        }
        let n = self.columns.len();
        if n == 0 || n > MAX_COLUMNS {
            return bad(format!("{n} columns (1 to {MAX_COLUMNS} allowed)"));
        }
        if self.sum.len() != n || self.sum_sq.len() != n || self.count.len() != n {
            return bad(format!(
                "{} columns but {} sums, {} sums of squares and {} counts",
                n,
                self.sum.len(),
                self.sum_sq.len(),
                self.count.len()
            ));
        }
        if let Some(k) = (0..n).find(|&k| !self.sum[k].is_finite() || !self.sum_sq[k].is_finite()) {
            return bad(format!("column '{}' has a non-finite sum", self.columns[k]));
        }
        if let Some(k) = (0..n).find(|&k| self.sum_sq[k] < 0.0) {
            return bad(format!("column '{}' has a negative sum of squares", self.columns[k]));
        }
        Ok(())
    }

    /// Suppresses small cells: every column observed fewer than `min` times is reported as never
    /// observed (sums and count 0), because a count of 1 would reveal the value itself. Returns
    /// how many columns were suppressed.
    pub fn suppress_below(&mut self, min: u64) -> usize {
        let mut n = 0;
        for k in 0..self.columns.len() {
            if self.count[k] > 0 && self.count[k] < min {
                (self.sum[k], self.sum_sq[k], self.count[k]) = (0.0, 0.0, 0);
                n += 1;
            }
        }
        n
    }

    /// The smallest non-zero count (the size of the smallest group these statistics describe).
    pub fn min_count(&self) -> Option<u64> {
        self.count.iter().copied().filter(|&c| c > 0).min()
    }

    /// Sums several sites' statistics of one group, in the order given (a fixed order gives the
    /// same bits on every run).
    ///
    /// # Errors
    /// Nothing to merge, or parts over different groups or columns.
    pub fn merge(parts: &[&GroupSums]) -> Result<GroupSums, StandardisationError> {
        let first =
            parts.first().ok_or_else(|| StandardisationError::Invalid(String::new(), "no statistics".into()))?;
        let mut merged = (*first).clone();
        for p in &parts[1..] {
            if p.group != merged.group || p.columns != merged.columns {
                return Err(StandardisationError::ColumnsDiffer {
                    group: merged.group.clone(),
                    ours: merged.columns.clone(),
                    theirs: p.columns.clone(),
                });
            }
            for k in 0..merged.columns.len() {
                merged.sum[k] += p.sum[k];
                merged.sum_sq[k] += p.sum_sq[k];
                merged.count[k] += p.count[k];
            }
        }
        Ok(merged)
    }

    /// Means (0 for a column never observed) and sample standard deviations (n − 1; 1 for a
    /// column with fewer than two values or no spread (sd ≤ 1e-12, as `FeatureStats::std`), so that standardising never divides by 0).
    pub fn mean_std(&self) -> (Vec<f32>, Vec<f32>) {
        let mut mean = Vec::with_capacity(self.columns.len());
        let mut std = Vec::with_capacity(self.columns.len());
        for k in 0..self.columns.len() {
            let n = self.count[k] as f64;
            let m = if self.count[k] == 0 { 0.0 } else { self.sum[k] / n };
            let s = if self.count[k] < 2 {
                1.0
            } else {
                let sd = (((self.sum_sq[k] - n * m * m) / (n - 1.0)).max(0.0)).sqrt();
                if sd > 1e-12 { sd } else { 1.0 }
            };
            mean.push(m as f32);
            std.push(s as f32);
        }
        (mean, std)
    }
}

/// Encodes statistics for a spool file (bincode; f64 exact).
pub fn encode_sums(groups: &[GroupSums]) -> Vec<u8> {
    bincode::serde::encode_to_vec(groups, bincode::config::standard()).unwrap_or_default()
}

/// Decodes [`encode_sums`]' bytes, checking every group.
///
/// # Errors
/// Damaged bytes or a group that fails [`GroupSums::check`].
pub fn decode_sums(bytes: &[u8]) -> Result<Vec<GroupSums>, StandardisationError> {
    let limit = bincode::config::standard().with_limit::<{ 64 << 20 }>();
    let (groups, used): (Vec<GroupSums>, usize) = bincode::serde::decode_from_slice(bytes, limit)
        .map_err(|e| StandardisationError::Invalid(String::new(), format!("damaged statistics: {e}")))?;
    if used != bytes.len() {
        return Err(StandardisationError::Invalid(String::new(), "trailing bytes after the statistics".into()));
    }
    for g in &groups {
        g.check()?;
    }
    Ok(groups)
}

/// A named tensor: `(name, shape, values)`, as [`ParameterSet::from_tensors`] takes them.
pub type NamedTensor = (String, Vec<usize>, Vec<f32>);

/// The name of a group's tensor (`mean` or `std`).
pub fn tensor_name(group: &str, which: &str) -> String {
    format!("{PREFIX}{group}.{which}")
}

/// The unset standardisation tensors of `groups` (`(group, width)`), to append to a model's
/// tensors: means 0, standard deviations 0 (unset).
pub fn unset_tensors(groups: &[(&str, usize)]) -> Vec<NamedTensor> {
    groups
        .iter()
        .flat_map(|&(g, n)| {
            [(tensor_name(g, "mean"), vec![n], vec![0.0; n]), (tensor_name(g, "std"), vec![n], vec![0.0; n])]
        })
        .collect()
}

/// The groups a model carries, with their widths, in layout order.
pub fn groups(layout: &Layout) -> Vec<(String, usize)> {
    layout
        .specs()
        .iter()
        .filter_map(|s| {
            let g = s.name.strip_prefix(PREFIX)?.strip_suffix(".mean")?;
            Some((g.to_string(), s.numel()))
        })
        .collect()
}

/// A group's `(mean, std)` as the model carries them; `None` when the group is absent or unset
/// (any standard deviation that is not a positive finite number).
pub fn read(params: &ParameterSet, group: &str) -> Option<(Vec<f32>, Vec<f32>)> {
    let mean = params.get(&tensor_name(group, "mean"))?;
    let std = params.get(&tensor_name(group, "std"))?;
    if std.iter().any(|s| !(s.is_finite() && *s > 0.0)) || mean.iter().any(|m| !m.is_finite()) {
        return None;
    }
    Some((mean.to_vec(), std.to_vec()))
}

/// Writes merged statistics into the model's standardisation tensors.
///
/// # Errors
/// A group the model does not carry, or one of another width.
pub fn write(params: &mut ParameterSet, stats: &[GroupSums]) -> Result<(), StandardisationError> {
    let widths = groups(params.layout());
    let mut plan = Vec::new();
    for g in stats {
        let width = widths
            .iter()
            .find(|(name, _)| *name == g.group)
            .map(|(_, w)| *w)
            .ok_or_else(|| StandardisationError::UnknownGroup(g.group.clone()))?;
        if width != g.columns.len() {
            return Err(StandardisationError::WidthMismatch {
                group: g.group.clone(),
                model: width,
                stats: g.columns.len(),
            });
        }
        let (mean, std) = g.mean_std();
        plan.push((tensor_name(&g.group, "mean"), mean));
        plan.push((tensor_name(&g.group, "std"), std));
    }
    let offsets: Vec<(String, usize)> = {
        let mut off = 0;
        params
            .layout()
            .specs()
            .iter()
            .map(|s| {
                let o = off;
                off += s.numel();
                (s.name.clone(), o)
            })
            .collect()
    };
    let values = params.values_mut();
    for (name, v) in plan {
        let (_, o) =
            offsets.iter().find(|(n, _)| *n == name).ok_or(StandardisationError::UnknownGroup(name.clone()))?;
        values[*o..*o + v.len()].copy_from_slice(&v);
    }
    Ok(())
}

/// Splits a model into its trainable part and its standardisation tensors (in layout order).
///
/// # Errors
/// Only on an inconsistent set (not expected from a valid one).
pub fn split(params: &ParameterSet) -> Result<(ParameterSet, Vec<NamedTensor>), ParamsError> {
    let mut model = Vec::new();
    let mut stats = Vec::new();
    for (spec, v) in params.tensors() {
        let t = (spec.name.clone(), spec.shape.clone(), v.to_vec());
        if spec.name.starts_with(PREFIX) { stats.push(t) } else { model.push(t) }
    }
    Ok((ParameterSet::from_tensors(model)?, stats))
}

/// Appends standardisation tensors (from [`split`]) to a trainable part again.
///
/// # Errors
/// A name collision or a limit exceeded.
pub fn attach(model: ParameterSet, stats: &[NamedTensor]) -> Result<ParameterSet, ParamsError> {
    if stats.is_empty() {
        return Ok(model);
    }
    let mut tensors: Vec<NamedTensor> =
        model.tensors().map(|(s, v): (&TensorSpec, &[f32])| (s.name.clone(), s.shape.clone(), v.to_vec())).collect();
    tensors.extend(stats.iter().cloned());
    ParameterSet::from_tensors(tensors)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sums(group: &str, xs: &[&[Option<f64>]]) -> GroupSums {
        let cols = xs[0].len();
        let mut g = GroupSums::new(group, (0..cols).map(|k| format!("c{k}")).collect());
        for row in xs {
            for (k, x) in row.iter().enumerate() {
                if let Some(x) = x {
                    g.add(k, *x);
                }
            }
        }
        g
    }

    #[test]
    fn merged_sums_give_the_pooled_mean_and_sample_std() {
        let a = sums("clinical", &[&[Some(1.0), Some(10.0)], &[Some(2.0), None]]);
        let b = sums("clinical", &[&[Some(4.0), Some(14.0)], &[Some(5.0), Some(12.0)], &[None, None]]);
        let m = GroupSums::merge(&[&a, &b]).unwrap();
        let (mean, std) = m.mean_std();
        // Pooled column 0: 1, 2, 4, 5 → mean 3, sample sd sqrt(10/3).
        assert!((mean[0] - 3.0).abs() < 1e-6);
        assert!((std[0] - (10.0f32 / 3.0).sqrt()).abs() < 1e-6);
        // Column 1: 10, 14, 12 → mean 12, sd 2.
        assert!((mean[1] - 12.0).abs() < 1e-6 && (std[1] - 2.0).abs() < 1e-6);
        assert_eq!(m.count, vec![4, 3]);
        assert_eq!(m.min_count(), Some(3));
        let mut small = m.clone();
        assert_eq!(small.suppress_below(4), 1);
        assert_eq!((small.count.clone(), small.sum[1], small.sum_sq[1]), (vec![4, 0], 0.0, 0.0));
        assert_eq!(small.mean_std().0[1], 0.0, "a suppressed column is left as it is");
    }

    #[test]
    fn degenerate_columns_get_unit_std() {
        let g = sums("wsi", &[&[Some(2.0), Some(1.0), None], &[Some(2.0), None, None]]);
        let (mean, std) = g.mean_std();
        assert_eq!(mean, vec![2.0, 1.0, 0.0]);
        assert_eq!(std, vec![1.0, 1.0, 1.0]);
    }

    #[test]
    fn merge_refuses_other_columns_and_check_refuses_bad_sums() {
        let a = sums("clinical", &[&[Some(1.0), Some(2.0)]]);
        let mut b = a.clone();
        b.columns[1] = "other".into();
        assert!(matches!(GroupSums::merge(&[&a, &b]), Err(StandardisationError::ColumnsDiffer { .. })));
        let mut c = a.clone();
        c.sum[0] = f64::NAN;
        assert!(c.check().unwrap_err().to_string().contains("non-finite"));
        let mut d = a.clone();
        d.count.pop();
        assert!(d.check().is_err());
        let mut e = a.clone();
        e.group = "bad group".into();
        assert!(e.check().is_err());
        assert!(a.check().is_ok());
    }

    #[test]
    fn write_read_split_attach_round_trip() {
        let mut tensors = vec![("w".to_string(), vec![2], vec![0.5, -0.5])];
        tensors.extend(unset_tensors(&[("clinical", 2)]));
        let mut p = ParameterSet::from_tensors(tensors).unwrap();
        assert_eq!(groups(p.layout()), vec![("clinical".to_string(), 2)]);
        assert!(read(&p, "clinical").is_none(), "a fresh model is unset");
        let s = sums("clinical", &[&[Some(1.0), Some(3.0)], &[Some(3.0), Some(3.0)]]);
        write(&mut p, std::slice::from_ref(&s)).unwrap();
        let (mean, std) = read(&p, "clinical").unwrap();
        assert_eq!(mean, vec![2.0, 3.0]);
        assert!((std[0] - 2f32.sqrt()).abs() < 1e-6 && std[1] == 1.0);
        let (model, stats) = split(&p).unwrap();
        assert_eq!(model.numel(), 2);
        let back = attach(model, &stats).unwrap();
        let coded = encode_sums(std::slice::from_ref(&s));
        assert_eq!(decode_sums(&coded).unwrap(), vec![s.clone()]);
        assert!(decode_sums(&coded[..coded.len() - 1]).is_err());
        assert_eq!(back.fingerprint(), p.fingerprint());
        assert_eq!(back.values(), p.values());
        let wrong = sums("clinical", &[&[Some(1.0)]]);
        assert!(matches!(write(&mut p, &[wrong]), Err(StandardisationError::WidthMismatch { .. })));
        assert!(matches!(write(&mut p, &[sums("wsi", &[&[Some(1.0)]])]), Err(StandardisationError::UnknownGroup(_))));
    }
}
