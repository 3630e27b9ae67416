//! A run of tokens as one row's blob: the count, the ids, then each byte offset as its
//! difference from the one before (zigzag), all LEB128 varints. About 3–4 bytes a token instead
//! of 12, so a turn's tokens fit in a page or two — and every page a save touches is written
//! twice (the WAL, then the checkpoint).

use crate::attention::MAX_POSITION;
use crate::session::TokenRun;

fn put(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn take(data: &mut &[u8]) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let (&b, rest) = data.split_first()?;
        *data = rest;
        v |= u64::from(b & 0x7f) << shift;
        if b < 0x80 {
            return Some(v);
        }
    }
    None
}

/// The blob of a run of `ids` starting at the bytes `offsets`.
pub fn encode(ids: &[u32], offsets: &[u64]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 * ids.len() + 4);
    put(&mut out, ids.len() as u64);
    for &id in ids {
        put(&mut out, u64::from(id));
    }
    let mut previous = 0u64;
    for &o in offsets {
        let delta = o.wrapping_sub(previous) as i64;
        put(&mut out, ((delta << 1) ^ (delta >> 63)) as u64);
        previous = o;
    }
    out
}

/// The run starting at position `first` from its blob; `None` when the blob is damaged or the
/// run would end past [`MAX_POSITION`].
pub fn decode(first: u64, mut data: &[u8]) -> Option<TokenRun> {
    let n = usize::try_from(take(&mut data)?).ok()?;
    // Every value takes a byte at least: a count past what is left is damage, not a size to
    // allocate.
    if n > data.len() / 2 || first.checked_add(n as u64)? > MAX_POSITION {
        return None;
    }
    let mut run = TokenRun::starting_at(first);
    run.ids = (0..n)
        .map(|_| u32::try_from(take(&mut data)?).ok())
        .collect::<Option<_>>()?;
    let mut previous = 0u64;
    run.offsets = (0..n)
        .map(|_| {
            let z = take(&mut data)?;
            let delta = ((z >> 1) as i64) ^ -((z & 1) as i64);
            previous = previous.wrapping_add(delta as u64);
            Some(previous)
        })
        .collect::<Option<_>>()?;
    data.is_empty().then_some(run)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_come_back_and_damage_is_refused() {
        let ids = [0, 1, 127, 128, 151_935, u32::MAX];
        let offsets = [0, 3, 3, 1 << 40, 17, u64::MAX];
        let blob = encode(&ids, &offsets);
        let run = decode(9, &blob).unwrap();
        assert_eq!(
            (run.first, &run.ids[..], &run.offsets[..]),
            (9, &ids[..], &offsets[..])
        );
        assert_eq!(decode(0, &encode(&[], &[])).unwrap().ids, Vec::<u32>::new());
        // A typical turn: ids under 2^17, offsets a few bytes apart.
        let ids: Vec<u32> = (0..500).map(|i| (i * 7919) % 151_936).collect();
        let offsets: Vec<u64> = (0..500).map(|i| 10_000_000 + 4 * i).collect();
        assert!(encode(&ids, &offsets).len() < 4 * 500);
        for cut in [0, 1, blob.len() / 2, blob.len() - 1] {
            assert!(decode(0, &blob[..cut]).is_none(), "cut at {cut}");
        }
        let mut longer = blob.clone();
        longer.push(0);
        assert!(decode(0, &longer).is_none(), "trailing bytes");
        assert!(decode(0, &[0xff; 11]).is_none(), "a varint past 64 bits");
        let mut huge = Vec::new();
        put(&mut huge, u64::MAX / 2);
        assert!(decode(0, &huge).is_none(), "a count past the data");
        let mut wide = Vec::new();
        put(&mut wide, 1);
        put(&mut wide, u64::from(u32::MAX) + 1);
        put(&mut wide, 0);
        assert!(decode(0, &wide).is_none(), "an id past 32 bits");
    }
}
