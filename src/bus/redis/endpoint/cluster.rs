//! Redis Cluster's side of the endpoint: reading the slot map from the seeds, and reaching each
//! primary it names with the seeds' scheme and credentials.

use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::future::join_all;

use super::{client, connection_config, master_url, Endpoint, Failure, Fault, Master, Sentinel, Target};
use crate::bus::redis::shards::{Primary, Topology};
use crate::config::mask_url_password;

impl Endpoint {
    /// Reads the cluster's slot map from the first seed that answers (starting with the last one
    /// that did); returns it with the index of that seed. A seed without cluster support, or one
    /// that refuses the password, is a configuration fault; a map with unserved slots (the
    /// cluster is down or still forming) an outage.
    pub(crate) async fn discover(&self, timeout: Duration) -> Result<(Topology, usize), Failure> {
        let Target::Cluster { seeds, first } = &self.target else {
            return Err(Failure {
                key: self.key(),
                shown: self.describe(),
                addr: String::new(),
                reason: "not a cluster".into(),
                fault: Fault::NotCluster,
            });
        };
        let key = "bus.redis_cluster_urls";
        let mut last: Option<Failure> = None;
        let start = first.load(Ordering::Relaxed);
        for index in (0..seeds.len()).map(|i| (start + i) % seeds.len()) {
            let seed = &seeds[index];
            let at = seed.client.get_connection_info().addr().to_string();
            let host = at.rsplit_once(':').map_or(at.as_str(), |(h, _)| h).to_string();
            let fail = |e: &redis::RedisError| self.failure(key, &seed.shown, &at, e);
            let asked = async {
                let mut conn = seed
                    .client
                    .get_multiplexed_async_connection_with_config(&connection_config(timeout))
                    .await
                    .map_err(|e| fail(&e))?;
                redis::cmd("CLUSTER").arg("SLOTS").query_async::<redis::Value>(&mut conn).await.map_err(|e| {
                    if e.to_string().contains("cluster support disabled") {
                        return Failure {
                            key,
                            shown: seed.shown.clone(),
                            addr: at.clone(),
                            reason: "not a cluster node (cluster support disabled): list nodes of a \
                                     Redis Cluster, or use bus.kind redis"
                                .into(),
                            fault: Fault::NotCluster,
                        };
                    }
                    fail(&e)
                })
            };
            let reply = match asked.await {
                Ok(reply) => reply,
                Err(failure) => {
                    tracing::debug!(error = %failure, "cluster seed could not be read");
                    if last.as_ref().is_none_or(|l| !l.fault.is_config()) {
                        last = Some(failure);
                    }
                    continue;
                }
            };
            let unusable = |reason: String| Failure {
                key,
                shown: seed.shown.clone(),
                addr: at.clone(),
                reason,
                fault: Fault::Unreachable,
            };
            let Some(topology) = Topology::parse(&reply, &host) else {
                last = Some(unusable(
                    "unreadable CLUSTER SLOTS reply, or a primary announced as `?` (no hostname \
                     set under cluster-preferred-endpoint-type hostname)"
                        .into(),
                ));
                continue;
            };
            let uncovered = topology.uncovered();
            if uncovered > 0 {
                last = Some(unusable(format!(
                    "the cluster serves no primary for {uncovered} slots (down or forming)"
                )));
                continue;
            }
            first.store(index, Ordering::Relaxed);
            return Ok((topology, index));
        }
        Err(last.unwrap_or_else(|| Failure {
            key,
            shown: String::new(),
            addr: String::new(),
            reason: "no seed configured".into(),
            fault: Fault::Unreachable,
        }))
    }

    /// A client for a cluster primary, reached with the seed's scheme and `user:password@`.
    pub(crate) fn primary(&self, seed: &usize, primary: &Primary) -> Result<Master, Failure> {
        let key = "bus.redis_cluster_urls";
        let Target::Cluster { seeds, .. } = &self.target else {
            return Err(Failure {
                key,
                shown: String::new(),
                addr: String::new(),
                reason: "not a cluster".into(),
                fault: Fault::NotCluster,
            });
        };
        let url = master_url(&seeds[*seed].url, &primary.host, primary.port);
        let shown = mask_url_password(&url);
        let client = client(&url, self.roots.as_deref(), true, key).map_err(|e| Failure {
            key,
            shown: shown.clone(),
            addr: primary.addr(),
            reason: e.to_string(),
            fault: Fault::Unreachable,
        })?;
        Ok(Master {
            client,
            addr: primary.addr(),
            shown: format!("primary {shown}"),
            check_role: false,
            key,
            sentinel: None,
        })
    }

    /// `check_all` under Cluster: each seed on its own (PING), then every primary the first
    /// answering seed names.
    pub(super) async fn check_cluster(
        &self,
        seeds: &[Sentinel],
        timeout: Duration,
        out: &mut Vec<(String, Result<String, Failure>)>,
    ) {
        // Each seed on its own (PING), then every primary the first answering seed names.
        let seed_masters: Vec<Master> = seeds
            .iter()
            .map(|s| Master {
                client: s.client.clone(),
                addr: s.client.get_connection_info().addr().to_string(),
                shown: format!("seed {}", s.shown),
                check_role: false,
                key: "bus.redis_cluster_urls",
                sentinel: None,
            })
            .collect();
        let pinged = join_all(seed_masters.iter().map(|m| self.check_master(m, timeout))).await;
        for (m, result) in seed_masters.iter().zip(pinged) {
            out.push((m.shown.clone(), result));
        }
        match self.discover(timeout).await {
            Err(failure) => out.push(("cluster slot map".into(), Err(failure))),
            Ok((topology, seed)) => {
                let n = topology.primaries.len();
                out.push(("cluster slot map".into(), Ok(format!("{n} primaries serve every slot"))));
                let masters: Vec<Result<Master, Failure>> =
                    topology.primaries.iter().map(|p| self.primary(&seed, p)).collect();
                let checked = join_all(masters.iter().map(|m| async move {
                    match m {
                        Ok(m) => (m.shown.clone(), self.check_master(m, timeout).await),
                        Err(f) => (f.shown.clone(), Err(self.failure_copy(f))),
                    }
                }))
                .await;
                out.extend(checked);
            }
        }
    }

    /// A copy of a failure (it holds no source error).
    fn failure_copy(&self, f: &Failure) -> Failure {
        Failure {
            key: f.key,
            shown: f.shown.clone(),
            addr: f.addr.clone(),
            reason: f.reason.clone(),
            fault: f.fault,
        }
    }
}
