//! The study lead's side of the admin RPCs: run control, the allow-list, the model export.

use super::{ServerTarget, TransportError, connect_admin};
use fedhcc_proto as pb;
use fedhcc_proto::chunks::{ChunkError, ChunkReceiver};
use pb::admin_client::AdminClient;
use tonic::transport::Channel;

/// What the study lead can tell a running server to do with the run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunControl {
    Start,
    Pause,
    Resume,
    Abort,
}

/// The server's answer to an admin command.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AdminAnswer {
    pub message: String,
    pub run_control: String,
    pub phase: String,
}

impl From<pb::AdminReply> for AdminAnswer {
    fn from(r: pb::AdminReply) -> Self {
        Self { message: r.message, run_control: r.run_control, phase: r.phase }
    }
}

/// What the server says of the model an export sends (its length, SHA-256 and layout were checked).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Exported {
    pub study_id: String,
    pub run_id: String,
    pub round: u32,
    /// SHA-256 of the checkpoint, hex.
    pub sha256: String,
    pub model_fingerprint: String,
    pub total_bytes: u64,
}

/// The study lead's connection to the admin RPCs (start, pause, resume, abort, allow-list,
/// export); the server accepts them from the admin certificate only.
pub struct Admin {
    client: AdminClient<Channel>,
}

impl Admin {
    /// Opens a mutual-TLS connection to the admin RPCs.
    ///
    /// # Errors
    /// As [`connect_admin`].
    pub async fn open(target: &ServerTarget) -> Result<Self, TransportError> {
        Ok(Self { client: connect_admin(target).await? })
    }

    /// Starts, pauses, resumes or aborts the run.
    ///
    /// # Errors
    /// A refusal or a broken connection.
    pub async fn control(&mut self, command: RunControl) -> Result<AdminAnswer, TransportError> {
        let command = match command {
            RunControl::Start => pb::ControlCommand::Start,
            RunControl::Pause => pb::ControlCommand::Pause,
            RunControl::Resume => pb::ControlCommand::Resume,
            RunControl::Abort => pb::ControlCommand::Abort,
        };
        let r = self.client.control(pb::ControlRequest { command: command.into() }).await?.into_inner();
        Ok(r.into())
    }

    /// Puts a site on the allow-list or takes it off.
    ///
    /// # Errors
    /// A refusal or a broken connection.
    pub async fn set_site_access(&mut self, site_id: &str, allowed: bool) -> Result<AdminAnswer, TransportError> {
        let request = pb::SiteAccessRequest { site_id: site_id.to_string(), allowed };
        let r = self.client.set_site_access(request).await?.into_inner();
        Ok(r.into())
    }

    /// Receives the newest committed model into `sink`, chunk by chunk, checking its length and
    /// SHA-256 against the server's header as it arrives. `sink` sees every byte before the check of
    /// the whole: write into a temporary file and keep it only on success.
    ///
    /// # Errors
    /// A refusal, a broken stream, a model larger than fedhcc accepts, a transfer that does not
    /// match its header, or what `sink` returns ([`TransportError::Sink`]).
    pub async fn export(
        &mut self,
        mut sink: impl FnMut(&[u8]) -> std::io::Result<()>,
    ) -> Result<Exported, TransportError> {
        let mut stream = self.client.export_model(pb::ExportRequest {}).await?.into_inner();
        let header = match stream.message().await? {
            Some(pb::ExportPart { part: Some(pb::export_part::Part::Header(h)) }) => h,
            _ => {
                return Err(TransportError::Damaged(
                    "the server's answer did not start with the model's header".into(),
                ));
            }
        };
        let limit = (fedhcc_core::params::MAX_PARAMS * 4 + fedhcc_core::params::MAX_HEADER_LEN) as u64;
        if header.total_bytes > limit {
            return Err(TransportError::Damaged(format!(
                "the server announces a model of {} bytes, more than fedhcc accepts ({limit})",
                header.total_bytes
            )));
        }
        let refused = |e: ChunkError| TransportError::Damaged(format!("the model transfer was refused: {e}"));
        let mut receiver = ChunkReceiver::new(header.total_bytes, None);
        while let Some(part) = stream.message().await? {
            let Some(pb::export_part::Part::Chunk(chunk)) = part.part else {
                return Err(TransportError::Damaged("a second header arrived inside the model".into()));
            };
            receiver.accept(&chunk).map_err(refused)?;
            sink(&chunk).map_err(TransportError::Sink)?;
        }
        receiver.finish(&header.sha256).map_err(refused)?;
        Ok(Exported {
            study_id: header.study_id,
            run_id: header.run_id,
            round: header.round,
            sha256: header.sha256,
            model_fingerprint: header.model_fingerprint,
            total_bytes: header.total_bytes,
        })
    }
}
