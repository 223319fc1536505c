//! A PostgreSQL snapshot in its text form (`pg_current_snapshot()::text`, "xmin:xmax:xip,..."),
//! and the test `pg_visible_in_snapshot` makes, in plain Rust: the provider of a joining node
//! asks it of every transaction in its stream while the join's copies and the stream overlap
//! (src/log/changelog.rs, src/runtime/join.rs).

/// A snapshot: transactions below `xmin` are finished, those at or past `xmax` had not
/// started, and `xip` lists those running in between.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    xmin: u64,
    xmax: u64,
    xip: Vec<u64>,
}

impl Snapshot {
    /// Parses "xmin:xmax:xip1,xip2,..."; `None` for anything else.
    pub fn parse(text: &str) -> Option<Snapshot> {
        let mut parts = text.trim().split(':');
        let xmin = parts.next()?.parse().ok()?;
        let xmax = parts.next()?.parse().ok()?;
        let list = parts.next()?;
        if parts.next().is_some() || xmin > xmax {
            return None;
        }
        let mut xip = Vec::new();
        for x in list.split(',').filter(|x| !x.is_empty()) {
            let x: u64 = x.parse().ok()?;
            if x < xmin || x >= xmax {
                return None;
            }
            xip.push(x);
        }
        xip.sort_unstable();
        Some(Snapshot { xmin, xmax, xip })
    }

    /// The first transaction id not yet started when the snapshot was taken.
    pub fn xmax(&self) -> u64 {
        self.xmax
    }

    /// The transactions running when the snapshot was taken, in order.
    pub fn running(&self) -> &[u64] {
        &self.xip
    }

    /// Whether the committed transaction `txid` (a full, 64-bit id) is visible in the
    /// snapshot: it finished before the snapshot was taken.
    pub fn sees(&self, txid: u64) -> bool {
        txid < self.xmin || (txid < self.xmax && self.xip.binary_search(&txid).is_err())
    }
}

#[cfg(test)]
mod tests {
    use super::Snapshot;

    #[test]
    fn parses_the_text_form_and_refuses_anything_else() {
        let s = Snapshot::parse("10:20:12,15").unwrap();
        assert_eq!(s, Snapshot { xmin: 10, xmax: 20, xip: vec![12, 15] });
        assert_eq!(Snapshot::parse("10:10:"), Some(Snapshot { xmin: 10, xmax: 10, xip: vec![] }));
        for bad in ["", "10", "10:20", "20:10:", "10:20:9", "10:20:20", "a:20:", "10:20:12:1", "10:20:x"] {
            assert_eq!(Snapshot::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn sees_what_finished_before_it_and_nothing_running_or_later() {
        let s = Snapshot::parse("10:20:12,15").unwrap();
        assert!(s.sees(3));
        assert!(s.sees(10));
        assert!(s.sees(19));
        assert!(!s.sees(12));
        assert!(!s.sees(15));
        assert!(!s.sees(20));
        assert!(!s.sees(25));
    }
}
