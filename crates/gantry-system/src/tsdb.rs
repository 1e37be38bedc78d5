//! The metrics history: Gantry's registry sampled every `[metrics] step` into `.gantry/tsdb/`
//! (whatever the store backend: a node's own history), queried over the admin API.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::anyhow;
use gantry_telemetry::Metrics;
use gantry_tsdb::{Tsdb, TsdbOptions};
use tokio::sync::watch;

use crate::components::TaskSlot;
use crate::Component;

pub const TSDB_DIR: &str = "tsdb";

pub(crate) struct TsdbComponent {
    pub tsdb: Arc<Tsdb>,
    metrics: Metrics,
    task: TaskSlot,
    ready: AtomicBool,
}

impl TsdbComponent {
    pub async fn build(
        spec: &gantry_spec::MetricsSpec,
        data_dir: &std::path::Path,
        metrics: &Metrics,
    ) -> anyhow::Result<Self> {
        let dir = data_dir.join(TSDB_DIR);
        let log = gantry_store::SegmentLog::open(&dir)
            .map_err(|e| anyhow!("the metrics history in {}: {e}", dir.display()))?;
        // Validated at load.
        let options = TsdbOptions {
            step: humantime::parse_duration(&spec.step)
                .unwrap_or(std::time::Duration::from_secs(30)),
            max_age: humantime::parse_duration(&spec.retention)
                .unwrap_or(std::time::Duration::from_secs(7 * 86_400)),
            max_bytes: spec.max_disk_bytes,
        };
        let tsdb = Tsdb::open(Arc::new(log), options, metrics)
            .await
            .map_err(|e| anyhow!("the metrics history in {}: {e}", dir.display()))?;
        Ok(Self {
            tsdb,
            metrics: metrics.clone(),
            task: TaskSlot::default(),
            ready: AtomicBool::new(false),
        })
    }
}

#[async_trait::async_trait]
impl Component for TsdbComponent {
    fn name(&self) -> &'static str {
        "tsdb"
    }

    async fn start(&self, shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
        let task = tokio::spawn(self.tsdb.clone().run(self.metrics.clone(), shutdown));
        self.task.set(task);
        self.ready.store(true, Ordering::Relaxed);
        Ok(())
    }

    fn ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    async fn stopped(&self) {
        self.task.join(Duration::from_secs(10)).await;
        self.ready.store(false, Ordering::Relaxed);
    }
}
