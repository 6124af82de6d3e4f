//! Every protocol message, decoded with prost as tonic would (the first byte picks the type), then
//! put through the server's checks that are pure functions: strings and counts, metrics, task ids,
//! task refusals, statistics sums against a model with standardisation groups, the evaluation
//! summary, and an upload chunk through the payload reader. Oracle: re-encoding a decoded message
//! is stable (decode ∘ encode is the identity on what was decoded), and nothing panics.
#![no_main]

use fedhcc_core::params::{Layout, ParameterSet, PayloadReader};
use fedhcc_proto as pb;
use fedhcc_server::service::{check_metrics, check_refusal, check_samples, check_statistics, check_text};
use libfuzzer_sys::fuzz_target;
use prost::Message;
use std::sync::OnceLock;

/// A model with two standardisation groups, as the statistics task checks against.
fn layout() -> &'static Layout {
    static L: OnceLock<Layout> = OnceLock::new();
    L.get_or_init(|| {
        let mut t = vec![("w".to_string(), vec![2], vec![0.0; 2])];
        t.extend(fedhcc_core::standardisation::unset_tensors(&[("clinical", 3), ("wsi", 2)]));
        ParameterSet::from_tensors(t).expect("a valid model").layout().clone()
    })
}

/// Decodes `bytes` as `M`; on success checks that re-encoding is stable and returns it.
fn decode<M: Message + Default>(bytes: &[u8]) -> Option<M> {
    let m = M::decode(bytes).ok()?;
    let once = m.encode_to_vec();
    let again = M::decode(once.as_slice()).expect("an encoded message decodes");
    assert_eq!(again.encode_to_vec(), once, "re-encoding is stable");
    Some(m)
}

fn task_ref(t: &pb::TaskRef) {
    for (f, s) in [("study_id", &t.study_id), ("run_id", &t.run_id), ("task_id", &t.task_id)] {
        let _ = check_text(f, s, fedhcc_proto::MAX_STRING_LEN);
    }
    if let Some((_, round, attempt)) = fedhcc_server::coordinator::parse_task_id(&t.task_id) {
        let _ = (round, attempt);
    }
    let _ = t.describe();
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, bytes)) = data.split_first() else { return };
    match which % 21 {
        0 => {
            if let Some(m) = decode::<pb::JoinRequest>(bytes) {
                let _ = check_text("client_version", &m.client_version, fedhcc_proto::MAX_STRING_LEN);
                let _ = check_samples("num_samples", m.num_samples);
            }
        }
        1 => {
            decode::<pb::WaitTaskRequest>(bytes);
        }
        2 => {
            if let Some(t) = decode::<pb::TaskRef>(bytes) {
                task_ref(&t);
            }
        }
        3 => match decode::<pb::UploadPart>(bytes).and_then(|p| p.part) {
            Some(pb::upload_part::Part::Header(h)) => {
                let _ = check_metrics(&h.metrics);
                if let Some(t) = &h.task {
                    task_ref(t);
                }
            }
            Some(pb::upload_part::Part::Chunk(c)) => {
                let _ = PayloadReader::new().push(&c, |_, _| {});
            }
            None => {}
        },
        4 => {
            if let Some(r) = decode::<pb::EvaluationReport>(bytes) {
                let _ = check_samples("num_samples", r.num_samples);
                let _ = check_metrics(&r.metrics);
                let rules = fedhcc_stats::federated::SummaryRules {
                    histogram_bins: 100,
                    time_grid_days: 30.0,
                    study_cutoff: None,
                    min_cell_floor: fedhcc_core::standardisation::MIN_CELL,
                };
                if !r.summary.is_empty() {
                    let _ = fedhcc_stats::federated::SiteEvaluation::decode(&r.summary, &rules);
                }
            }
        }
        5 => {
            if let Some(r) = decode::<pb::StatisticsReport>(bytes)
                && let Ok(groups) = check_statistics(&r.groups, layout())
            {
                // What passed is what the server spools and pools.
                let bytes = fedhcc_core::standardisation::encode_sums(&groups);
                let back = fedhcc_core::standardisation::decode_sums(&bytes).expect("spooled sums decode");
                assert_eq!(back.len(), groups.len());
                let parts: Vec<_> = back.iter().filter(|g| g.group == "clinical").collect();
                let _ = fedhcc_core::standardisation::GroupSums::merge(&parts);
            }
        }
        6 => {
            if let Some(r) = decode::<pb::TaskRefusal>(bytes) {
                let _ = check_refusal(&r.rule, &r.message);
            }
        }
        7 => {
            decode::<pb::StatusRequest>(bytes);
        }
        8 => {
            decode::<pb::KeyAdvertisement>(bytes);
        }
        9 => {
            decode::<pb::ControlRequest>(bytes);
        }
        10 => {
            decode::<pb::SiteAccessRequest>(bytes);
        }
        11 => {
            decode::<pb::ExportRequest>(bytes);
        }
        // What a client decodes from the server.
        12 => {
            decode::<pb::JoinReply>(bytes);
        }
        13 => {
            if let Some(ev) = decode::<pb::TaskEvent>(bytes) {
                match ev.event {
                    Some(pb::task_event::Event::Train(t)) => t.task.iter().for_each(task_ref),
                    Some(pb::task_event::Event::Evaluate(t)) => t.task.iter().for_each(task_ref),
                    Some(pb::task_event::Event::Statistics(t)) => t.task.iter().for_each(task_ref),
                    _ => {}
                }
            }
        }
        14 => {
            if let Some(pb::model_part::Part::Chunk(c)) = decode::<pb::ModelPart>(bytes).and_then(|p| p.part) {
                let _ = PayloadReader::new().push(&c, |_, _| {});
            }
        }
        15 => {
            decode::<pb::KeyRoster>(bytes);
        }
        16 => {
            decode::<pb::StatusReply>(bytes);
        }
        17 => {
            decode::<pb::AdminReply>(bytes);
        }
        18 => {
            decode::<pb::ExportPart>(bytes);
        }
        19 => {
            decode::<pb::UploadReply>(bytes);
        }
        _ => {
            decode::<pb::Ack>(bytes);
        }
    }
});
