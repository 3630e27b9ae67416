//! A KV snapshot, structure-aware: a well-formed safetensors file with the shapes the model
//! expects (so the fuzzer spends its time past the parser) but arbitrary ring positions, seen
//! counts, next position, pins and slot counts → restore → attend → save → restore. A snapshot
//! either is refused with an error or works all the way: what it saves again restores.
#![no_main]

use std::collections::HashMap;

use arbitrary::Arbitrary;
use lambdachat::attention::{
    AttentionCache, AttentionError, AttentionInput, HostCache, LambdaParams, LayerGeometry, Rope, RopeStyle,
};
use libfuzzer_sys::fuzz_target;
use safetensors::tensor::{Dtype, TensorView};

const KV_HEADS: usize = 1;
const HEAD_DIM: usize = 4;
const HEADS: usize = 2;

#[derive(Arbitrary, Debug)]
struct Layer {
    sliding: Option<u8>,
    seen: u64,
    global_pos: Vec<u64>,
    ring_pos: Vec<u64>,
    /// Extra or missing rows in one of the six tensors (0 = consistent).
    skew: u8,
}

#[derive(Arbitrary, Debug)]
struct Snapshot {
    n_global: u8,
    n_local: u8,
    /// Parameters saved in the header, when they differ from those asked for.
    saved_params: Option<(u16, u16, u64)>,
    next_position: u64,
    pinned: Vec<(u64, u64)>,
    layers: Vec<Layer>,
    values: Vec<f32>,
    tokens: u8,
}

fuzz_target!(|s: Snapshot| {
    let Ok(params) = LambdaParams::new(s.n_global as usize % 6, s.n_local as usize % 12 + 1, None)
    else {
        return;
    };
    let layers: Vec<LayerGeometry> = s
        .layers
        .iter()
        .take(3)
        .map(|l| match l.sliding {
            Some(w) => LayerGeometry::sliding(params, KV_HEADS, HEAD_DIM, w as usize % 8 + 1),
            None => LayerGeometry::full(params, KV_HEADS, HEAD_DIM),
        })
        .collect();
    if layers.is_empty() {
        return;
    }
    let row = KV_HEADS * HEAD_DIM;
    let value = |i: usize| {
        s.values
            .get(i % s.values.len().max(1))
            .copied()
            .unwrap_or(0.5)
    };
    let mut owned: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (i, l) in s.layers.iter().take(3).enumerate() {
        let (g, r) = (l.global_pos.len().min(16), l.ring_pos.len().min(16));
        let skewed = |which: u8, n: usize| {
            if l.skew % 7 == which { n + 1 } else { n }
        };
        let floats = |n: usize| -> Vec<u8> {
            (0..n * row)
                .flat_map(|j| value(j + i).to_le_bytes())
                .collect()
        };
        let positions = |p: &[u64], n: usize| -> Vec<u8> {
            (0..n)
                .flat_map(|j| p.get(j).copied().unwrap_or(j as u64).to_le_bytes())
                .collect()
        };
        for (name, n, data, dtype, width) in [
            (
                "global_k",
                skewed(1, g),
                floats(skewed(1, g)),
                Dtype::F32,
                row,
            ),
            (
                "global_v",
                skewed(2, g),
                floats(skewed(2, g)),
                Dtype::F32,
                row,
            ),
            (
                "global_pos",
                skewed(3, g),
                positions(&l.global_pos, skewed(3, g)),
                Dtype::U64,
                1,
            ),
            (
                "ring_k",
                skewed(4, r),
                floats(skewed(4, r)),
                Dtype::F32,
                row,
            ),
            (
                "ring_v",
                skewed(5, r),
                floats(skewed(5, r)),
                Dtype::F32,
                row,
            ),
            (
                "ring_pos",
                skewed(6, r),
                positions(&l.ring_pos, skewed(6, r)),
                Dtype::U64,
                1,
            ),
        ] {
            let shape = if width == 1 { vec![n] } else { vec![n, width] };
            owned.push((format!("layers.{i}.{name}"), dtype, shape, data));
        }
    }
    let (n_global, n_local, limit) = match s.saved_params {
        Some((g, l, d)) => (g as usize, l as usize, d),
        None => (params.n_global, params.n_local, params.distance_limit),
    };
    let header = serde_json::json!({
        "n_global": n_global,
        "n_local": n_local,
        "distance_limit": limit,
        "next_position": s.next_position,
        "seen": s.layers.iter().take(3).map(|l| l.seen).collect::<Vec<_>>(),
        "pinned": s.pinned.iter().take(8).collect::<Vec<_>>(),
    });
    let metadata = HashMap::from([
        ("format".to_string(), "lambdachat-kv-1".to_string()),
        ("lambda".to_string(), header.to_string()),
    ]);
    let views: Vec<(String, TensorView<'_>)> = owned
        .iter()
        .map(|(name, dtype, shape, data)| {
            (
                name.clone(),
                TensorView::new(*dtype, shape.clone(), data).expect("consistent view"),
            )
        })
        .collect();
    let bytes = safetensors::serialize(views, Some(metadata)).expect("serialize");
    let Ok(mut cache) = HostCache::from_snapshot(&bytes, params, layers.clone()) else {
        return;
    };
    // Attend a few tokens on every layer, as a forward would.
    let n = s.tokens as usize % 4 + 1;
    let q: Vec<f32> = (0..n * HEADS * HEAD_DIM).map(|j| value(j * 3)).collect();
    let kv: Vec<f32> = (0..n * KV_HEADS * HEAD_DIM).map(|j| value(j * 5)).collect();
    let rope = Rope::new(HEAD_DIM, 10_000.0, RopeStyle::Neox);
    let input = AttentionInput {
        q: &q,
        k: &kv,
        v: &kv,
        n_tokens: n,
        n_heads: HEADS,
        rope: &rope,
        scale: 0.5,
    };
    for layer in 0..layers.len() {
        let out = match cache.attend(layer, &input) {
            // At the end of the position range a forward is refused, in every layer alike.
            Err(AttentionError::PositionLimit) if layer == 0 => break,
            out => out.expect("a restored cache attends"),
        };
        assert_eq!(out.len(), n * HEADS * HEAD_DIM);
        if layer + 1 == layers.len() {
            cache.advance(n);
        }
    }
    let again = cache.to_snapshot().expect("a restored cache saves");
    HostCache::from_snapshot(&again, params, layers).expect("what was saved restores");
});
