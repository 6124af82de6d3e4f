//! Small numeric helpers shared by the modules: input checks, distributions, ranks, quantiles.

use crate::{Result, StatsError};
use statrs::distribution::{ChiSquared, ContinuousCDF, Normal};

/// Two-sided normal critical value for a confidence level (0.95 → 1.959963984540054).
pub(crate) fn z_critical(level: f64) -> Result<f64> {
    if !(level > 0.0 && level < 1.0) {
        return Err(StatsError::undefined("confidence interval", format!("level {level} is not in (0, 1)")));
    }
    Ok(standard_normal().inverse_cdf(0.5 + level / 2.0))
}

fn standard_normal() -> Normal {
    Normal::standard()
}

/// Two-sided p-value of a standard normal statistic.
pub(crate) fn normal_two_sided_p(z: f64) -> f64 {
    2.0 * standard_normal().sf(z.abs())
}

/// Upper tail of a chi-squared distribution.
pub(crate) fn chi2_sf(x: f64, df: usize) -> Result<f64> {
    let dist = ChiSquared::new(df as f64)
        .map_err(|e| StatsError::undefined("chi-squared p-value", format!("{df} degrees of freedom: {e}")))?;
    Ok(dist.sf(x))
}

/// Checks that every value is finite; names the first row (1-based) that is not.
pub(crate) fn check_finite(what: &'static str, values: &[f64]) -> Result<()> {
    match values.iter().position(|v| !v.is_finite()) {
        None => Ok(()),
        Some(i) => {
            Err(StatsError::BadValue { what, row: i + 1, value: values[i].to_string(), expected: "a finite number" })
        }
    }
}

/// Checks that `values` has `expected` entries.
pub(crate) fn check_len(what: &'static str, got: usize, expected: usize) -> Result<()> {
    if got == expected { Ok(()) } else { Err(StatsError::LengthMismatch { what, got, expected }) }
}

/// Refuses a score that is the same for every patient: it ranks nobody, and a concordance of ½ would
/// look like a result.
pub(crate) fn check_not_constant(statistic: &'static str, values: &[f64]) -> Result<()> {
    match values.first() {
        Some(first) if values.len() > 1 && values.iter().all(|v| v == first) => Err(StatsError::undefined(
            statistic,
            format!("all {} scores are equal ({first}): the score does not rank the patients", values.len()),
        )),
        _ => Ok(()),
    }
}

/// Checks that every value is a probability in [0, 1].
pub(crate) fn check_probabilities(what: &'static str, values: &[f64]) -> Result<()> {
    check_finite(what, values)?;
    match values.iter().position(|v| !(0.0..=1.0).contains(v)) {
        None => Ok(()),
        Some(i) => Err(StatsError::BadValue {
            what,
            row: i + 1,
            value: values[i].to_string(),
            expected: "a probability in [0, 1]",
        }),
    }
}

/// 1-based mid-ranks (ties get the mean of the ranks they span).
pub(crate) fn midranks(values: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&a, &b| values[a].total_cmp(&values[b]));
    let mut ranks = vec![0.0; values.len()];
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j < order.len() && values[order[j]] == values[order[i]] {
            j += 1;
        }
        // positions i..j (0-based) share the mean 1-based rank (i+1 + j)/2
        let rank = (i + 1 + j) as f64 / 2.0;
        for &k in &order[i..j] {
            ranks[k] = rank;
        }
        i = j;
    }
    ranks
}

/// Mean of a non-empty slice.
pub(crate) fn mean(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len() as f64
}

/// Sample covariance (n − 1 denominator) of two equally long slices with at least two values.
pub(crate) fn sample_cov(a: &[f64], b: &[f64]) -> f64 {
    let (ma, mb) = (mean(a), mean(b));
    a.iter().zip(b).map(|(x, y)| (x - ma) * (y - mb)).sum::<f64>() / (a.len() as f64 - 1.0)
}

/// Quantile with linear interpolation between order statistics (Hyndman & Fan type 7, numpy's
/// default). `sorted` must be sorted and non-empty.
pub(crate) fn quantile_sorted(sorted: &[f64], q: f64) -> f64 {
    let h = (sorted.len() - 1) as f64 * q;
    let lo = h.floor() as usize;
    let hi = (lo + 1).min(sorted.len() - 1);
    sorted[lo] + (h - lo as f64) * (sorted[hi] - sorted[lo])
}

/// Logit of a probability.
pub(crate) fn logit(p: f64) -> f64 {
    (p / (1.0 - p)).ln()
}

/// Logistic function, stable for large |x|.
pub(crate) fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// Solves `a x = b` for a small symmetric positive definite matrix by Gaussian elimination with
/// partial pivoting; `None` when the matrix is singular.
pub(crate) fn solve(mut a: Vec<Vec<f64>>, mut b: Vec<f64>) -> Option<Vec<f64>> {
    let n = b.len();
    let scale = a.iter().flatten().fold(0.0_f64, |m, v| m.max(v.abs()));
    if scale == 0.0 {
        return None;
    }
    for col in 0..n {
        let pivot = (col..n).max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs()))?;
        if a[pivot][col].abs() <= scale * 1e-12 {
            return None;
        }
        a.swap(col, pivot);
        b.swap(col, pivot);
        let (upper, lower) = a.split_at_mut(col + 1);
        let pivot_row = &upper[col];
        for (offset, row) in lower.iter_mut().enumerate() {
            let factor = row[col] / pivot_row[col];
            for (x, p) in row[col..].iter_mut().zip(&pivot_row[col..]) {
                *x -= factor * p;
            }
            b[col + 1 + offset] -= factor * b[col];
        }
    }
    let mut x = vec![0.0; n];
    for row in (0..n).rev() {
        let s: f64 = (row + 1..n).map(|k| a[row][k] * x[k]).sum();
        x[row] = (b[row] - s) / a[row][row];
    }
    Some(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn midranks_average_ties() {
        assert_eq!(midranks(&[3.0, 1.0, 3.0, 2.0]), vec![3.5, 1.0, 3.5, 2.0]);
    }

    #[test]
    fn quantile_matches_numpy_linear() {
        // numpy.quantile([1, 2, 4, 8], [0.025, 0.5, 0.975]) = [1.075, 3.0, 7.7]
        let v = [1.0, 2.0, 4.0, 8.0];
        assert!((quantile_sorted(&v, 0.025) - 1.075).abs() < 1e-12);
        assert!((quantile_sorted(&v, 0.5) - 3.0).abs() < 1e-12);
        assert!((quantile_sorted(&v, 0.975) - 7.7).abs() < 1e-12);
    }

    #[test]
    fn distributions_match_scipy() {
        // scipy.stats.norm.ppf(0.975), chi2.sf(3.84, 1), chi2.sf(10, 3)
        assert!((z_critical(0.95).unwrap() - 1.959963984540054).abs() < 1e-12);
        assert!((chi2_sf(3.84, 1).unwrap() - 0.05004352124870519).abs() < 1e-12);
        assert!((chi2_sf(10.0, 3).unwrap() - 0.01856613546304325).abs() < 1e-12);
        // statrs' erfc is good to ~1e-10 relative here: far inside the 1e-6 the references are compared at.
        assert!((normal_two_sided_p(1.959963984540054) - 0.05).abs() < 1e-10);
    }

    #[test]
    fn solve_refuses_singular_matrix() {
        assert!(solve(vec![vec![1.0, 2.0], vec![2.0, 4.0]], vec![1.0, 1.0]).is_none());
        let x = solve(vec![vec![4.0, 1.0], vec![1.0, 3.0]], vec![1.0, 2.0]).unwrap();
        assert!((x[0] - 1.0 / 11.0).abs() < 1e-12 && (x[1] - 7.0 / 11.0).abs() < 1e-12);
    }
}
