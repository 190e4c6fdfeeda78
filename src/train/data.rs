//! Training data: JSONL question/answer files (read by [`crate::eval::answers`]) and the seeded
//! data order.

pub use crate::eval::answers::{read_examples, Example};

use crate::nn::splitmix64;

/// The example order of epoch `epoch`: a Fisher–Yates shuffle of `0..n` seeded by `(seed, epoch)`.
/// A pure function of its arguments, so a resumed run sees exactly the order of the original one.
pub fn epoch_order(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut state = seed ^ epoch.wrapping_mul(0xd1b5_4a32_d192_ed03);
    for i in (1..n).rev() {
        let j = (splitmix64(&mut state) % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    order
}

/// The examples of global position `start..start + len` in the stream of epochs (each epoch a fresh
/// permutation), as indices into the dataset of `n` examples.
pub fn stream_slice(n: usize, seed: u64, start: u64, len: usize) -> Vec<usize> {
    let mut out = Vec::with_capacity(len);
    let mut pos = start;
    let mut cached: Option<(u64, Vec<usize>)> = None;
    while out.len() < len {
        let epoch = pos / n as u64;
        if cached.as_ref().map(|c| c.0) != Some(epoch) {
            cached = Some((epoch, epoch_order(n, seed, epoch)));
        }
        let order = &cached.as_ref().expect("set above").1;
        out.push(order[(pos % n as u64) as usize]);
        pos += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_is_a_seeded_permutation() {
        let a = epoch_order(10, 42, 0);
        let mut s = a.clone();
        s.sort();
        assert_eq!(s, (0..10).collect::<Vec<_>>());
        assert_eq!(a, epoch_order(10, 42, 0));
        assert_ne!(a, epoch_order(10, 42, 1));
        assert_ne!(a, epoch_order(10, 43, 0));
        // The stream crosses epochs.
        let s = stream_slice(10, 42, 8, 4);
        assert_eq!(&s[..2], &a[8..]);
        assert_eq!(&s[2..], &epoch_order(10, 42, 1)[..2]);
    }

    #[test]
    fn bad_lines_name_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("train.jsonl");
        std::fs::write(
            &p,
            "{\"question\": \"q\", \"answers\": [\"a\"]}\n\n{\"question\": \"q2\"}\n",
        )
        .unwrap();
        let e = format!("{:#}", read_examples(&p).unwrap_err());
        assert!(e.contains("train.jsonl:3"), "{e}");
        std::fs::write(&p, "{\"question\": \"q\", \"answers\": []}\n").unwrap();
        let e = format!("{:#}", read_examples(&p).unwrap_err());
        assert!(e.contains("train.jsonl:1") && e.contains("answers"), "{e}");
    }
}
