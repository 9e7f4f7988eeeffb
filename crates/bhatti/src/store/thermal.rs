//! The store as the thermal manager's [`Records`]: transitions go to the
//! `events` table, `keep_hot` flags and owners come from `sandboxes`.

use futures_util::future::BoxFuture;

use super::events::NewEvent;
use super::Store;
use crate::thermal::{Records, SandboxRecord, ThermalEvent};

impl Records for Store {
    fn record(&self, owner: Option<String>, e: ThermalEvent) -> BoxFuture<'static, ()> {
        let store = self.clone();
        Box::pin(async move {
            let mut ne = NewEvent::new(&e.sandbox_id, e.kind.as_str()).latency_ms(e.latency_ms);
            ne.owner = owner;
            // Users read this (GET /events): no host paths.
            ne.detail = Some(match &e.detail {
                Some(d) => format!("{}→{}: {}", e.from, e.to, crate::api::scrub_host_paths(d)),
                None => format!("{}→{}", e.from, e.to),
            });
            if let Err(err) = store.run(move |c| super::events::record(c, &ne)).await {
                tracing::warn!(id = %e.sandbox_id, "recording a thermal event: {err}");
            }
        })
    }

    fn sandboxes(&self) -> BoxFuture<'static, Result<Vec<SandboxRecord>, String>> {
        let store = self.clone();
        Box::pin(async move {
            let rows = store
                .run(|c| super::sandboxes::list_all(c))
                .await
                .map_err(|e| e.to_string())?;
            Ok(rows
                .into_iter()
                .map(|r| SandboxRecord {
                    id: r.id,
                    owner: r.owner,
                    keep_hot: r.keep_hot,
                })
                .collect())
        })
    }
}
