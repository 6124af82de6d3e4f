//! fedhcc-client: a site's client. It dials out to the server over mutual TLS, waits for tasks,
//! runs them with an [`Executor`] (local training and evaluation on the site's own data) and
//! returns only weights deltas and aggregate metrics. It reconnects with exponential backoff and
//! jitter, so a server restart or a network outage only delays it.
//!
//! - [`runner`]: the task loop ([`run`]): join, wait for tasks, run them, report; reconnects.
//! - [`task`]: the tasks and answers as the task loop sees them (plain values).
//! - [`transport`]: the TLS channel and every RPC, with the conversion from and to the wire's
//!   messages (the only place prost and tonic are used).
//! - [`local_layers`]: FedBN, an executor wrapper that keeps normalisation layers at the site.
//! - [`secagg`]: secure aggregation at the site (key pair per task, DP clipping and noise, fixed
//!   point, pairwise masks); the server sees only masked words.
//! - [`site_policy`]: the site's `[policy]` applied to every task before it runs; a declined task
//!   is logged here and reported to the server (`RefuseTask`), and the client goes on waiting.
//! - [`audit`]: `state_dir/audit.jsonl`, every message carrying task data, sent or received.

pub mod audit;
pub mod local_layers;
mod runner;
pub mod secagg;
pub mod site_policy;
pub mod status;
pub mod task;
pub mod transport;

use fedhcc_core::params::{Fingerprint, ParameterSet};
use fedhcc_core::standardisation::GroupSums;
pub use runner::run;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
pub use transport::{ServerTarget, TransportError};

/// Hyper-parameters of a train task, as the executor sees them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TrainSpec {
    pub round: u32,
    pub total_rounds: u32,
    pub local_epochs: u32,
    pub batch_size: u32,
    pub learning_rate: f64,
    pub weight_decay: f64,
    pub prox_mu: f64,
    pub seed: u64,
}

/// What local training returns.
#[derive(Clone, Debug)]
pub struct TrainResult {
    /// The locally trained weights (the client sends their delta against the global model).
    pub params: ParameterSet,
    /// FedAvg weight.
    pub num_samples: u64,
    /// Aggregate metrics only, e.g. `train_loss`.
    pub metrics: Vec<(String, f64)>,
}

/// What an evaluation returns: aggregate metrics only, never per-patient values.
#[derive(Clone, Debug)]
pub struct EvalResult {
    pub num_samples: u64,
    pub metrics: Vec<(String, f64)>,
    /// The site's evaluation summary (its own statistics, score histograms, survival counts, under
    /// its minimum cell size); `None` when the executor makes none.
    pub summary: Option<fedhcc_stats::federated::SiteEvaluation>,
}

/// Lets a long task notice that it should stop, and report how far it is (shown in
/// `status.json` while it runs).
#[derive(Clone, Debug, Default)]
pub struct TaskControl {
    cancelled: Arc<AtomicBool>,
    /// (done, total) in units of work, e.g. epochs; total 0 = nothing reported.
    progress: Arc<(AtomicU64, AtomicU64)>,
}

impl TaskControl {
    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Relaxed)
    }
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::Relaxed);
    }
    /// Notes that `done` of `total` units of work (epochs) are finished.
    pub fn report_progress(&self, done: u64, total: u64) {
        self.progress.0.store(done.min(total), Ordering::Relaxed);
        self.progress.1.store(total, Ordering::Relaxed);
    }
    /// The last progress reported: (done, total).
    pub fn progress(&self) -> Option<(u64, u64)> {
        let total = self.progress.1.load(Ordering::Relaxed);
        (total > 0).then(|| (self.progress.0.load(Ordering::Relaxed), total))
    }
}

/// A failure inside local work.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ExecutorError(pub String);

/// Local work at a site (FLARE's Executor): a task in, a result out. Runs on a blocking thread.
pub trait Executor: Send + 'static {
    /// Layout of the model this site trains, to be checked against the server's at join.
    fn fingerprint(&self) -> Option<Fingerprint>;
    /// Training samples at this site (sent at join; used as the FedAvg weight).
    fn num_samples(&self) -> u64;
    /// Trains locally starting from `global`.
    ///
    /// # Errors
    /// The data or model cannot be used; the reason goes to the site's log.
    fn train(
        &mut self,
        global: &ParameterSet,
        spec: &TrainSpec,
        ctl: &TaskControl,
    ) -> Result<TrainResult, ExecutorError>;
    /// Evaluates `global` on the named split (`test` or `val`).
    ///
    /// # Errors
    /// The data or model cannot be used.
    fn evaluate(&mut self, global: &ParameterSet, split: &str, ctl: &TaskControl) -> Result<EvalResult, ExecutorError>;
    /// This site's training-split sums, sums of squares and counts per input group, for the
    /// study's pooled standardisation (`fedhcc_core::standardisation`): aggregates only, small
    /// cells already suppressed. The default (a model without standardisation) has none.
    ///
    /// # Errors
    /// The data cannot be summarised.
    fn statistics(&mut self) -> Result<Vec<GroupSums>, ExecutorError> {
        Ok(Vec::new())
    }
}

/// A boxed executor is an executor (for callers that choose one at run time).
impl Executor for Box<dyn Executor> {
    fn fingerprint(&self) -> Option<Fingerprint> {
        (**self).fingerprint()
    }
    fn num_samples(&self) -> u64 {
        (**self).num_samples()
    }
    fn train(
        &mut self,
        global: &ParameterSet,
        spec: &TrainSpec,
        ctl: &TaskControl,
    ) -> Result<TrainResult, ExecutorError> {
        (**self).train(global, spec, ctl)
    }
    fn evaluate(&mut self, global: &ParameterSet, split: &str, ctl: &TaskControl) -> Result<EvalResult, ExecutorError> {
        (**self).evaluate(global, split, ctl)
    }
    fn statistics(&mut self) -> Result<Vec<GroupSums>, ExecutorError> {
        (**self).statistics()
    }
}

/// Settings of a client run.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    pub site_id: String,
    pub study_id: String,
    pub run_id: String,
    pub target: ServerTarget,
    /// First reconnect delay; doubled each failure up to `max_backoff`, with ±50% jitter.
    pub min_backoff: Duration,
    pub max_backoff: Duration,
    /// Give up after this long without reaching the server (None = never).
    pub give_up_after: Option<Duration>,
    /// `status.json` and the audit log (`audit.jsonl`) are kept here for the site operator; `None`
    /// keeps neither.
    pub state_dir: Option<PathBuf>,
    /// What this site lets the server ask of it (the site configuration's `[policy]`).
    pub policy: fedhcc_secure::policy::SitePolicy,
}

/// How a client run ended.
#[derive(Clone, Debug, Default)]
pub struct ClientOutcome {
    pub finished: bool,
    pub rounds_trained: u32,
    pub evaluations: u32,
    pub bytes_down: u64,
    pub bytes_up: u64,
    pub final_model_sha256: String,
    /// Tasks declined under the site's policy.
    pub tasks_declined: u32,
}

/// A failure that ends the client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("gave up after {0:?} without reaching the server")]
    GaveUp(Duration),
    #[error("local task failed: {0}")]
    Executor(#[from] ExecutorError),
    #[error("{0}; nothing more is sent until the audit log can be written")]
    Audit(#[from] fedhcc_secure::audit::AuditError),
    #[error(
        "the server runs run '{server}' but this site's study file names run '{configured}'; this site takes part only \
         in the run its study file names (if the study lead started a new run, they send a new study file)"
    )]
    OtherRun { server: String, configured: String },
}
