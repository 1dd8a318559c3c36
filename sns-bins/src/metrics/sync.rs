//! The synchronizers' families: per origin, what was applied and how far behind the origin's
//! head this cluster is; per synchronizer on RabbitMQ, what it published and consumed.

use sns_core::ids::{ClusterId, Timestamp};
use sns_core::sync::{AmqpStats, Synchronizer};

use super::{Family, Labels, with};

/// Picks one count out of a transport's counts.
type Pick<'a> = &'a dyn Fn(&AmqpStats) -> u64;

/// Per origin: the high-water mark, the origin's head and the lag behind it, what was applied,
/// and the age of the newest applied event.
pub(super) fn sync_family(
    f: &mut Family<'_, '_>,
    syncs: &[(ClusterId, &Synchronizer)],
) -> std::fmt::Result {
    let now = Timestamp::now();
    let (mut high, mut head, mut behind) = (Vec::new(), Vec::new(), Vec::new());
    let (mut batches, mut events, mut age) = (Vec::new(), Vec::new(), Vec::new());
    for (cluster, synchronizer) in syncs {
        for (origin, s) in synchronizer.link().stats() {
            let labels = vec![
                ("cluster", cluster.to_string()),
                ("origin", origin.to_string()),
            ];
            high.push((labels.clone(), s.high_water as f64));
            if let (Some(at), Some(lag)) = (s.origin_head, s.behind()) {
                head.push((labels.clone(), at as f64));
                behind.push((labels.clone(), lag as f64));
            }
            batches.push((labels.clone(), s.batches));
            events.push((labels.clone(), s.events));
            if let Some(seconds) = s.newest_event_age_s(now) {
                age.push((labels, seconds));
            }
        }
    }
    f.gauges(
        "sns_sync_high_water",
        "The origin's highest sequence number applied to this cluster.",
        &high,
    )?;
    f.gauges(
        "sns_sync_origin_head",
        "The origin's own committed high-water mark, as its master answered when scraped.",
        &head,
    )?;
    f.gauges(
        "sns_sync_lag_events",
        "The origin's committed events not yet applied to this cluster: its head minus the high-water mark.",
        &behind,
    )?;
    f.counters(
        "sns_sync_applied_batches",
        "Batches of the origin's events applied.",
        &batches,
    )?;
    f.counters(
        "sns_sync_applied_events",
        "The origin's events applied.",
        &events,
    )?;
    f.gauges(
        "sns_sync_newest_applied_event_age_seconds",
        "Now minus the origin's time of its newest event applied here: the sync lag while the origin is writing (it also grows while the origin is idle).",
        &age,
    )
}

/// Per synchronizer on RabbitMQ: messages published, confirmed and refused by the broker,
/// delivered, redelivered and dropped (none for other transports).
pub(super) fn amqp_family(
    f: &mut Family<'_, '_>,
    syncs: &[(ClusterId, &Synchronizer)],
) -> std::fmt::Result {
    let mut rows: Vec<(Labels, AmqpStats)> = Vec::new();
    for (cluster, synchronizer) in syncs {
        if let Some(stats) = synchronizer.amqp_stats() {
            rows.push((vec![("cluster", cluster.to_string())], stats));
        }
    }
    let count = |pick: Pick<'_>| -> Vec<(Labels, u64)> {
        rows.iter().map(|(l, s)| (l.clone(), pick(s))).collect()
    };
    let by_reason = |reasons: &[(&str, Pick<'_>)]| {
        let mut out = Vec::new();
        for (labels, stats) in &rows {
            for (reason, pick) in reasons {
                out.push((
                    with(labels.clone(), "reason", reason.to_string()),
                    pick(stats),
                ));
            }
        }
        out
    };
    f.counters(
        "sns_sync_amqp_published",
        "Messages of this cluster's own events published to the exchange (republished ones included).",
        &count(&|s| s.published),
    )?;
    f.counters(
        "sns_sync_amqp_confirmed",
        "Published messages the broker confirmed (stored and routed).",
        &count(&|s| s.confirmed),
    )?;
    f.counters(
        "sns_sync_amqp_publish_refused",
        "Published messages the broker refused (nack) or could not route (returned); each ends the publisher's session.",
        &by_reason(&[("nack", &|s| s.nacked), ("returned", &|s| s.returned)]),
    )?;
    f.counters(
        "sns_sync_amqp_delivered",
        "Messages delivered to this synchronizer's consumer.",
        &count(&|s| s.delivered),
    )?;
    f.counters(
        "sns_sync_amqp_redelivered",
        "Deliveries the broker marked as redelivered (handed out before and not acknowledged).",
        &count(&|s| s.redelivered),
    )?;
    f.counters(
        "sns_sync_amqp_dropped",
        "Messages the consumer dropped: forged (bad MAC, or events the origin does not have), invalid, or postponed (read from the origin's master later).",
        &by_reason(&[
            ("forged", &|s| s.dropped_forged),
            ("invalid", &|s| s.dropped_invalid),
            ("postponed", &|s| s.dropped_postponed),
        ]),
    )
}
