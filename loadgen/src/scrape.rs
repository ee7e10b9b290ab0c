//! Reading the server's Prometheus `/metrics` text: the samples a run compares before and after.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::http::HttpConn;
use crate::target::Target;

/// How long one scrape may take.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(5);

/// Samples (`name{labels}` -> value) of the metrics whose name starts with one of `prefixes`.
pub(crate) fn parse(text: &str, prefixes: &[&str]) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && prefixes.iter().any(|p| l.starts_with(p)))
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// `after - before` for every sample in `after` (a sample missing before counts from 0).
pub(crate) fn delta(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>) -> BTreeMap<String, f64> {
    after.iter().map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0.0))).collect()
}

/// GETs `/metrics` and keeps the samples matching `prefixes`; errors say why it failed.
pub(crate) async fn fetch(target: &Target, prefixes: &[&str]) -> anyhow::Result<BTreeMap<String, f64>> {
    let scrape = async {
        let mut conn = HttpConn::connect(target).await?;
        let resp = conn.get(&target.host, &target.metrics_path()).await?;
        if resp.status != 200 {
            anyhow::bail!("/metrics answered HTTP {}", resp.status);
        }
        Ok(parse(&String::from_utf8_lossy(resp.body), prefixes))
    };
    tokio::time::timeout(SCRAPE_TIMEOUT, scrape)
        .await
        .unwrap_or_else(|_| Err(anyhow::anyhow!("/metrics timed out")))
}

/// [`fetch`] from every node, summed sample by sample (a cluster's counters); fails when any
/// node does.
pub(crate) async fn fetch_sum(
    targets: &[Target],
    prefixes: &[&str],
) -> anyhow::Result<BTreeMap<String, f64>> {
    let mut sum = BTreeMap::new();
    for target in targets {
        let one = fetch(target, prefixes).await.map_err(|e| e.context(target.host.clone()))?;
        add(&mut sum, &one);
    }
    Ok(sum)
}

/// Adds every sample of `more` into `sum`.
fn add(sum: &mut BTreeMap<String, f64>, more: &BTreeMap<String, f64>) {
    for (k, v) in more {
        *sum.entry(k.clone()).or_insert(0.0) += v;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_samples_with_labels_and_subtracts() {
        let text = "# HELP herald_catchups_total x\n# TYPE herald_catchups_total counter\n\
                    herald_catchups_total 5\n\
                    herald_recoveries_total{result=\"recovered\"} 12\n\
                    herald_recoveries_total{result=\"not_recovered\"} 0\n\
                    herald_frames_out_total 99\n";
        let before = parse(text, &["herald_catchups", "herald_recoveries"]);
        assert_eq!(before.len(), 3);
        assert_eq!(before["herald_recoveries_total{result=\"recovered\"}"], 12.0);
        let after = parse(
            "herald_catchups_total 9\nherald_recoveries_total{result=\"recovered\"} 20\nherald_catchups_new 1\n",
            &["herald_catchups", "herald_recoveries"],
        );
        let d = delta(&before, &after);
        assert_eq!(d["herald_catchups_total"], 4.0);
        assert_eq!(d["herald_recoveries_total{result=\"recovered\"}"], 8.0);
        assert_eq!(d["herald_catchups_new"], 1.0);
        let mut sum = before.clone();
        add(&mut sum, &after);
        assert_eq!(sum["herald_catchups_total"], 14.0);
        assert_eq!(sum["herald_catchups_new"], 1.0);
        assert_eq!(sum["herald_recoveries_total{result=\"not_recovered\"}"], 0.0);
    }
}
