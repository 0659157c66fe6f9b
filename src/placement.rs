//! Where a worker should go: rendezvous (highest-random-weight) hashing of
//! the worker id over the live head ids. Pure functions, so every worker
//! and head computes the same order without talking to each other, and a
//! head leaving moves only its own workers.

/// FNV-1a: stable across Rust versions and machines, unlike `DefaultHasher`,
/// which matters because different processes must agree on the order.
pub fn hash_str(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    mix(h)
}

/// The splitmix64 finaliser: spreads nearby inputs over all 64 bits.
pub fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The weight of `head` for `worker`; the highest weight wins.
pub fn weight(worker: &str, head: &str) -> u64 {
    mix(hash_str(worker) ^ hash_str(head).rotate_left(17))
}

/// Orders `heads` by preference for `worker`, best first. Ties (which need
/// a 64-bit collision) fall back to the id so the order is total.
pub fn rendezvous_order<'a, T>(
    worker: &str,
    heads: &'a [T],
    id: impl Fn(&T) -> &str,
) -> Vec<&'a T> {
    let mut scored: Vec<(u64, &T)> = heads.iter().map(|h| (weight(worker, id(h)), h)).collect();
    scored.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| id(a.1).cmp(id(b.1))));
    scored.into_iter().map(|(_, h)| h).collect()
}

/// The bounded-load limit ceil((1 + slack) * total / heads), with slack
/// in thousandths, in integers so every process computes the same value
/// as the registry's Lua script.
pub fn load_bound(total: u64, heads: u64, slack_permille: u32) -> u64 {
    let heads = heads.max(1);
    let slack = u64::from(slack_permille);
    ((1000 + slack) * total).div_ceil(1000 * heads)
}

/// Chooses, for each worker in turn, the first head in its rendezvous
/// order that stays within `bound`, counting the choices already made.
/// `loads[i]` is the load of `heads[i]` before any of these workers; it is
/// updated. Returns, per worker, the index of its head (None if every head
/// is at the bound).
pub fn assign_bounded(
    workers: &[&str],
    heads: &[&str],
    loads: &mut [u64],
    bound: u64,
) -> Vec<Option<usize>> {
    workers
        .iter()
        .map(|w| {
            let mut order: Vec<usize> = (0..heads.len()).collect();
            order.sort_by(|a, b| {
                weight(w, heads[*b])
                    .cmp(&weight(w, heads[*a]))
                    .then_with(|| heads[*a].cmp(heads[*b]))
            });
            let pick = order.into_iter().find(|i| loads[*i] < bound);
            if let Some(i) = pick {
                loads[i] += 1;
            }
            pick
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn first<'a>(worker: &str, heads: &'a [&'a str]) -> &'a str {
        rendezvous_order(worker, heads, |h| h)[0]
    }

    #[test]
    fn order_is_deterministic_and_complete() {
        let heads = ["a", "b", "c", "d"];
        let one = rendezvous_order("w1", &heads, |h| h);
        let two = rendezvous_order("w1", &heads, |h| h);
        assert_eq!(one, two);
        assert_eq!(one.len(), 4);
    }

    #[test]
    fn removing_a_head_moves_only_its_workers() {
        let all = ["h1", "h2", "h3", "h4"];
        let rest = ["h1", "h2", "h4"];
        for i in 0..1000 {
            let w = format!("worker-{i}");
            let before = first(&w, &all);
            let after = first(&w, &rest);
            if before != "h3" {
                assert_eq!(before, after, "{w} moved although its head stayed");
            }
        }
    }

    #[test]
    fn load_bound_matches_the_paper() {
        assert_eq!(load_bound(200, 3, 250), 84);
        assert_eq!(load_bound(300, 4, 250), 94);
        assert_eq!(load_bound(60, 3, 250), 25);
        assert_eq!(load_bound(1, 3, 250), 1);
        assert_eq!(load_bound(5, 0, 250), 7);
    }

    #[test]
    fn bounded_assignment_never_exceeds_the_bound() {
        let heads = ["a", "b", "c"];
        let names: Vec<String> = (0..300).map(|i| format!("w{i}")).collect();
        let workers: Vec<&str> = names.iter().map(String::as_str).collect();
        let mut loads = [0u64; 3];
        let bound = load_bound(300, 3, 50);
        let picks = assign_bounded(&workers, &heads, &mut loads, bound);
        assert!(picks.iter().all(Option::is_some));
        assert!(loads.iter().all(|l| *l <= bound), "{loads:?} > {bound}");
        assert_eq!(loads.iter().sum::<u64>(), 300);
    }

    #[test]
    fn spread_is_roughly_even() {
        let heads = ["h1", "h2", "h3"];
        let mut counts = [0usize; 3];
        for i in 0..3000 {
            let w = format!("worker-{i}");
            let h = first(&w, &heads);
            counts[heads.iter().position(|x| *x == h).unwrap()] += 1;
        }
        for c in counts {
            assert!((800..1200).contains(&c), "uneven spread: {counts:?}");
        }
    }
}
