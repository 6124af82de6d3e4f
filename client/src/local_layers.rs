//! FedBN at a site: the model's normalisation layers (by the study's rule) stay here. The server's
//! model and every upload hold only the shared parameters; [`LocalLayers`] merges the downloaded
//! shared parameters with this site's local ones before training or evaluating, and after training
//! keeps the new local ones and hands back only the shared part — so the task loop uploads the
//! delta of the shared parameters, and local layers never leave the site.
//!
//! The join fingerprint is that of the shared layout (what the server holds); the full layout,
//! local layers included, is checked here (the saved local parameters and every merged model must
//! match it) and again by the wrapped executor.
//!
//! The local parameters live in memory and in a file (written atomically after every local
//! training), so a client restarted in the middle of a run goes on with its own layers. Training
//! whose upload is then refused still advances them: they are this site's, not the round's.

use crate::{EvalResult, Executor, ExecutorError, TaskControl, TrainResult, TrainSpec};
use fedhcc_core::aggregation::{LocalParameters, merge_parts};
use fedhcc_core::params::{Fingerprint, Layout, ParameterSet};
use std::path::PathBuf;

/// An [`Executor`] that keeps the local layers of its model at the site (FedBN).
pub struct LocalLayers<E> {
    inner: E,
    rule: LocalParameters,
    full_layout: Layout,
    shared_layout: Layout,
    local: ParameterSet,
    file: Option<PathBuf>,
}

impl<E: Executor> LocalLayers<E> {
    /// Wraps `inner`, whose full model starts as `initial` (the study's initial model). The local
    /// part starts from `initial`'s, or from `file` when an earlier run of this client saved it.
    ///
    /// # Errors
    /// `initial` is not `inner`'s model, or `file` holds local layers of another model.
    pub fn new(
        inner: E,
        rule: LocalParameters,
        initial: &ParameterSet,
        file: Option<PathBuf>,
    ) -> Result<Self, ExecutorError> {
        if let Some(fp) = inner.fingerprint()
            && fp != initial.fingerprint()
        {
            return Err(ExecutorError(format!(
                "the study's initial model ({}) is not the model this site trains ({fp})",
                initial.fingerprint()
            )));
        }
        let (shared, mut local) = rule.split(initial).map_err(|e| ExecutorError(e.to_string()))?;
        if shared.layout().specs().is_empty() {
            return Err(ExecutorError(format!(
                "every parameter of the model matches the local rule ({}); nothing would be shared",
                rule.describe()
            )));
        }
        if let Some(path) = &file
            && path.exists()
        {
            let saved = std::fs::File::open(path)
                .map_err(|e| e.to_string())
                .and_then(|mut f| {
                    ParameterSet::read_from(&mut std::io::BufReader::new(&mut f)).map_err(|e| e.to_string())
                })
                .map_err(|e| ExecutorError(format!("{}: {e}", path.display())))?;
            if saved.fingerprint() != local.fingerprint() {
                return Err(ExecutorError(format!(
                    "{} holds local layers of another model ({} instead of {}); move it away to start this site's \
                     local layers afresh",
                    path.display(),
                    saved.fingerprint(),
                    local.fingerprint()
                )));
            }
            tracing::info!(path = %path.display(), "fedbn: this site's saved local layers restored");
            local = saved;
        }
        Ok(Self {
            inner,
            rule,
            full_layout: initial.layout().clone(),
            shared_layout: shared.layout().clone(),
            local,
            file,
        })
    }

    /// This site's current local parameters.
    pub fn local(&self) -> &ParameterSet {
        &self.local
    }

    /// The layout the server and the wire use (shared parameters only).
    pub fn shared_layout(&self) -> &Layout {
        &self.shared_layout
    }

    /// The wrapped executor.
    pub fn inner(&self) -> &E {
        &self.inner
    }

    fn full_model(&self, global: &ParameterSet) -> Result<ParameterSet, ExecutorError> {
        if global.fingerprint() != self.shared_layout.fingerprint() {
            return Err(ExecutorError(format!(
                "the server's model {} is not this site's shared layout {}",
                global.fingerprint(),
                self.shared_layout.fingerprint()
            )));
        }
        merge_parts(&self.full_layout, global, &self.local).map_err(|e| ExecutorError(e.to_string()))
    }

    fn keep_local(&mut self, local: ParameterSet) -> Result<(), ExecutorError> {
        if let Some(path) = &self.file {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(|e| ExecutorError(format!("{}: {e}", dir.display())))?;
            }
            fedhcc_core::pki::write_atomic(path, &local.encode(), false)
                .map_err(|e| ExecutorError(format!("saving this site's local layers: {e}")))?;
        }
        self.local = local;
        Ok(())
    }
}

impl<E: Executor> Executor for LocalLayers<E> {
    fn fingerprint(&self) -> Option<Fingerprint> {
        Some(self.shared_layout.fingerprint())
    }

    fn num_samples(&self) -> u64 {
        self.inner.num_samples()
    }

    fn train(
        &mut self,
        global: &ParameterSet,
        spec: &TrainSpec,
        ctl: &TaskControl,
    ) -> Result<TrainResult, ExecutorError> {
        let full = self.full_model(global)?;
        let out = self.inner.train(&full, spec, ctl)?;
        if out.params.fingerprint() != self.full_layout.fingerprint() {
            return Err(ExecutorError("the trained model's layout differs from the study model".into()));
        }
        let (shared, local) = self.rule.split(&out.params).map_err(|e| ExecutorError(e.to_string()))?;
        self.keep_local(local)?;
        Ok(TrainResult { params: shared, num_samples: out.num_samples, metrics: out.metrics })
    }

    fn evaluate(&mut self, global: &ParameterSet, split: &str, ctl: &TaskControl) -> Result<EvalResult, ExecutorError> {
        let full = self.full_model(global)?;
        self.inner.evaluate(&full, split, ctl)
    }
    fn statistics(&mut self) -> Result<Vec<fedhcc_core::standardisation::GroupSums>, ExecutorError> {
        self.inner.statistics()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Adds `delta` to every value it is given and records the names it saw.
    struct Adder {
        delta: f32,
        seen: Vec<Vec<String>>,
        fingerprint: Option<Fingerprint>,
    }

    impl Executor for Adder {
        fn fingerprint(&self) -> Option<Fingerprint> {
            self.fingerprint
        }
        fn num_samples(&self) -> u64 {
            4
        }
        fn train(&mut self, g: &ParameterSet, _: &TrainSpec, _: &TaskControl) -> Result<TrainResult, ExecutorError> {
            self.seen.push(g.layout().specs().iter().map(|s| s.name.clone()).collect());
            let mut p = g.clone();
            p.values_mut().iter_mut().for_each(|v| *v += self.delta);
            Ok(TrainResult { params: p, num_samples: 4, metrics: vec![] })
        }
        fn evaluate(&mut self, g: &ParameterSet, _: &str, _: &TaskControl) -> Result<EvalResult, ExecutorError> {
            self.seen.push(g.layout().specs().iter().map(|s| s.name.clone()).collect());
            Ok(EvalResult {
                num_samples: 1,
                metrics: vec![("sum".into(), g.values().iter().map(|&v| f64::from(v)).sum())],
                summary: None,
            })
        }
    }

    fn full() -> ParameterSet {
        ParameterSet::from_tensors(vec![
            ("conv.weight".into(), vec![2], vec![1.0, 2.0]),
            ("conv.bn.gamma".into(), vec![2], vec![1.0, 1.0]),
            ("head.bias".into(), vec![1], vec![0.0]),
        ])
        .unwrap()
    }

    fn spec() -> TrainSpec {
        TrainSpec {
            round: 1,
            total_rounds: 2,
            local_epochs: 1,
            batch_size: 1,
            learning_rate: 0.1,
            weight_decay: 0.0,
            prox_mu: 0.0,
            seed: 1,
        }
    }

    #[test]
    fn trains_the_full_model_returns_only_shared_parameters_and_keeps_local_ones() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("state/local.fhcp");
        let inner = Adder { delta: 0.5, seen: vec![], fingerprint: Some(full().fingerprint()) };
        let mut ex =
            LocalLayers::new(inner, LocalParameters::normalisation_layers(), &full(), Some(file.clone())).unwrap();
        let (shared, _) = LocalParameters::normalisation_layers().split(&full()).unwrap();
        assert_eq!(ex.fingerprint(), Some(shared.fingerprint()));
        let out = ex.train(&shared, &spec(), &TaskControl::default()).unwrap();
        let names: Vec<&str> = out.params.layout().specs().iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["conv.weight", "head.bias"], "only shared parameters go back to the task loop");
        assert_eq!(out.params.values(), &[1.5, 2.5, 0.5]);
        assert_eq!(ex.local().values(), &[1.5, 1.5]);
        assert_eq!(ex.inner().seen[0], ["conv.weight", "conv.bn.gamma", "head.bias"], "trained on the full model");
        // The next global model is merged with the site's local layers, not the initial ones.
        let ev = ex.evaluate(&shared, "test", &TaskControl::default()).unwrap();
        assert_eq!(ev.metrics[0].1, 1.0 + 2.0 + 1.5 + 1.5 + 0.0);
        // A restarted client picks its local layers up from the file.
        let again = LocalLayers::new(
            Adder { delta: 0.0, seen: vec![], fingerprint: None },
            LocalParameters::normalisation_layers(),
            &full(),
            Some(file),
        )
        .unwrap();
        assert_eq!(again.local().values(), &[1.5, 1.5]);
    }

    #[test]
    fn refuses_a_wrong_model_at_each_boundary() {
        let other = ParameterSet::from_tensors(vec![("x".into(), vec![1], vec![0.0])]).unwrap();
        let inner = Adder { delta: 0.0, seen: vec![], fingerprint: Some(other.fingerprint()) };
        let e = LocalLayers::new(inner, LocalParameters::normalisation_layers(), &full(), None).err().unwrap();
        assert!(e.0.contains("not the model this site trains"), "{e}");

        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("local.fhcp");
        std::fs::write(&file, other.encode()).unwrap();
        let inner = Adder { delta: 0.0, seen: vec![], fingerprint: None };
        let e = LocalLayers::new(inner, LocalParameters::normalisation_layers(), &full(), Some(file.clone()))
            .err()
            .unwrap();
        assert!(e.0.contains("local.fhcp") && e.0.contains("another model"), "{e}");

        let inner = Adder { delta: 0.0, seen: vec![], fingerprint: None };
        let mut ex = LocalLayers::new(inner, LocalParameters::normalisation_layers(), &full(), None).unwrap();
        let e = ex.train(&full(), &spec(), &TaskControl::default()).err().unwrap();
        assert!(e.0.contains("not this site's shared layout"), "{e}");

        let all = LocalParameters::from_patterns(vec!["*".into()]).unwrap();
        let inner = Adder { delta: 0.0, seen: vec![], fingerprint: None };
        assert!(LocalLayers::new(inner, all, &full(), None).is_err());
    }
}
