//! What the server asks of a site and what it answers, as the task loop sees them: plain values,
//! checked where they come from the network ([`crate::transport`] converts them from and to the
//! wire's messages).

/// Which task of which run a message is about.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TaskRef {
    pub study_id: String,
    pub run_id: String,
    pub round: u32,
    pub task_id: String,
}

impl TaskRef {
    /// A short human-readable form: `round 3 (task r3a1)`.
    pub fn describe(&self) -> String {
        format!("round {} (task {})", self.round, self.task_id)
    }
}

/// Secure aggregation's fixed-point encoding, as a train task carries it (checked by
/// [`crate::secagg::MaskingSpec::from_task`]).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct FixedPointSettings {
    pub clip: f64,
    pub scale: f64,
    pub max_weight: u64,
    pub max_sites: u32,
}

/// Train the global model locally and send the update.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TrainTask {
    pub task: TaskRef,
    pub model_fingerprint: String,
    pub model_bytes: u64,
    pub model_sha256: String,
    /// The local training asked for (round, epochs, batch size, learning rate, seed, …).
    pub spec: crate::TrainSpec,
    /// Whether the update is to be masked (secure aggregation).
    pub secure_aggregation: bool,
    /// Differential privacy: σ (0 = none) and the δ of the study's (ε, δ).
    pub dp_noise_multiplier: f64,
    pub dp_delta: f64,
    /// Under secure aggregation: how to encode the update before masking.
    pub fixed_point: Option<FixedPointSettings>,
    /// Under differential privacy: the L2 norm each site clips its update to.
    pub dp_l2_clip: f64,
}

/// Evaluate the global model on one split and send aggregate results.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EvaluateTask {
    pub task: TaskRef,
    pub model_fingerprint: String,
    pub model_bytes: u64,
    pub model_sha256: String,
    pub split: String,
}

/// Send the training split's feature sums for the pooled standardisation.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StatisticsTask {
    pub task: TaskRef,
    pub model_fingerprint: String,
}

/// One event on a site's task stream.
#[derive(Clone, Debug, PartialEq)]
pub enum TaskEvent {
    /// The server is alive; nothing to do.
    Heartbeat,
    /// The run is over.
    Finished {
        rounds_completed: u32,
        final_model_sha256: String,
    },
    Train(TrainTask),
    Evaluate(EvaluateTask),
    Statistics(StatisticsTask),
}

/// What the audit log records of a message: its kind, task, round and bytes as on the wire.
#[derive(Clone, Debug, PartialEq)]
pub struct AuditEntry {
    pub kind: &'static str,
    pub task_id: String,
    pub round: u32,
    pub bytes: Vec<u8>,
}

/// A task event as received, with what the audit log records of it (`None` for a heartbeat,
/// which carries no task data). The event is an error when the message is unusable (a task
/// without its reference): it is still recorded.
#[derive(Debug)]
pub struct Received {
    pub event: Result<TaskEvent, crate::TransportError>,
    pub audit: Option<AuditEntry>,
}

/// The server's answer to a join.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Joined {
    pub study_id: String,
    pub run_id: String,
    pub current_round: u32,
    pub total_rounds: u32,
}

/// A secure-aggregation task's roster as the server sent it (checked by
/// [`crate::secagg::roster_from_reply`]).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RosterReply {
    /// The task the roster is for (`None`: the server named none).
    pub task_id: Option<String>,
    /// `(site, public key)` per member, the key as sent (checked to be 32 bytes).
    pub members: Vec<(String, Vec<u8>)>,
    /// The server's digest of the roster.
    pub digest: Vec<u8>,
}

/// What goes with a masked update (`secagg-u64`): kept with the payload so that an upload cut by a
/// reconnect is sent again byte for byte.
#[derive(Clone, Debug, PartialEq)]
pub struct MaskedHeader {
    pub task: TaskRef,
    pub model_fingerprint: String,
    pub num_samples: u64,
    /// SHA-256 of the payload, hex.
    pub sha256: String,
    pub metrics: Vec<(String, f64)>,
    pub roster_digest: Vec<u8>,
    pub encoded_weight: u64,
}
