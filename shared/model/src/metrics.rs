//! Discrimination metrics computed at the site.

/// Area under the ROC curve as the Mann–Whitney statistic: the probability that a random positive
/// scores above a random negative, ties counting one half.
///
/// Labels are 0/1 (a label ≥ 0.5 counts as positive). Returns `None` when the lengths differ, a
/// score is NaN, or the labels hold only one class (AUC is undefined then).
pub fn auc(scores: &[f32], labels: &[f32]) -> Option<f64> {
    if scores.len() != labels.len() || scores.iter().any(|s| s.is_nan()) {
        return None;
    }
    let n_pos = labels.iter().filter(|&&l| l >= 0.5).count();
    let n_neg = labels.len() - n_pos;
    if n_pos == 0 || n_neg == 0 {
        return None;
    }
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    // Sum of the (1-based, tie-averaged) ranks of the positives.
    let mut rank_sum_pos = 0.0;
    let mut start = 0;
    while start < order.len() {
        let mut end = start + 1;
        while end < order.len() && scores[order[end]] == scores[order[start]] {
            end += 1;
        }
        let mean_rank = (start + 1 + end) as f64 / 2.0;
        let pos_in_group = order[start..end].iter().filter(|&&i| labels[i] >= 0.5).count();
        rank_sum_pos += mean_rank * pos_in_group as f64;
        start = end;
    }
    let (p, n) = (n_pos as f64, n_neg as f64);
    Some((rank_sum_pos - p * (p + 1.0) / 2.0) / (p * n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn perfect_inverted_and_random_orderings() {
        assert_eq!(auc(&[0.1, 0.2, 0.8, 0.9], &[0.0, 0.0, 1.0, 1.0]), Some(1.0));
        assert_eq!(auc(&[0.9, 0.8, 0.2, 0.1], &[0.0, 0.0, 1.0, 1.0]), Some(0.0));
        // Pairs (pos, neg): (0.8 vs 0.1) win, (0.8 vs 0.9) lose, (0.3 vs 0.1) win, (0.3 vs 0.9) lose.
        assert_eq!(auc(&[0.1, 0.8, 0.3, 0.9], &[0.0, 1.0, 1.0, 0.0]), Some(0.5));
    }

    #[test]
    fn ties_count_one_half() {
        assert_eq!(auc(&[0.5, 0.5], &[0.0, 1.0]), Some(0.5));
        assert_eq!(auc(&[0.5; 6], &[0.0, 1.0, 0.0, 1.0, 1.0, 0.0]), Some(0.5));
        // Positives {0.4, 0.7}, negatives {0.4, 0.2, 0.9}: pairs won 1 + 0.5(tie) + 0 + 1 + 1 + 0 = 3.5 of 6.
        let got = auc(&[0.4, 0.7, 0.4, 0.2, 0.9], &[1.0, 1.0, 0.0, 0.0, 0.0]).unwrap();
        assert!((got - 3.5 / 6.0).abs() < 1e-12, "{got}");
    }

    #[test]
    fn undefined_for_one_class_nan_or_mismatched_lengths() {
        assert_eq!(auc(&[0.1, 0.9], &[1.0, 1.0]), None);
        assert_eq!(auc(&[0.1, 0.9], &[0.0, 0.0]), None);
        assert_eq!(auc(&[], &[]), None);
        assert_eq!(auc(&[0.1, f32::NAN], &[0.0, 1.0]), None);
        assert_eq!(auc(&[0.1], &[0.0, 1.0]), None);
    }
}
