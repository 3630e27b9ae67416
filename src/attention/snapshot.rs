//! The bounded cache as a safetensors file, so a saved conversation resumes exactly where it
//! stopped without running its history through the model again.
//!
//! Per layer `i`: `layers.i.{global_k, global_v, ring_k, ring_v}` (`[slots, kv·head_dim]` as
//! f32 or f16, or `[slots, bytes]` of GGML's q8_0 blocks as u8: the cache's [`KvType`], which
//! restores with them)
//! and `layers.i.{global_pos, ring_pos}` (u64). The header's metadata holds the Λ parameters,
//! each layer's token count, the pinned ranges and a format tag. Loading checks every shape
//! against the model's own geometry: a snapshot from another model or other parameters is
//! refused, never half-used.

use std::collections::HashMap;
use std::ops::Range;

use safetensors::{Dtype, SafeTensors, tensor::TensorView};

use super::kv_store::{KvType, KvVec};
use super::{HostCache, HostLayerCache, LambdaParams, LayerGeometry, MAX_POSITION};

const FORMAT: &str = "lambdachat-kv-1";

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("not a KV snapshot: {0}")]
    Format(String),
    #[error("the snapshot does not fit this model or these Λ parameters: {0}")]
    Mismatch(String),
    #[error("moving the cache to or from the device failed: {0}")]
    Device(String),
}

impl From<safetensors::SafeTensorError> for SnapshotError {
    fn from(e: safetensors::SafeTensorError) -> Self {
        Self::Format(e.to_string())
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Header {
    n_global: usize,
    n_local: usize,
    distance_limit: u64,
    next_position: u64,
    seen: Vec<u64>,
    pinned: Vec<(u64, u64)>,
}

/// The snapshot stores little-endian values; on such machines (all lambdachat runs on) the
/// in-memory bytes are already that, and a cast saves a conversion pass over ~100 MB.
#[cfg(target_endian = "little")]
fn bytes_of<T: bytemuck::Pod>(x: &[T]) -> &[u8] {
    bytemuck::cast_slice(x)
}

/// Values from little-endian bytes (`pod_collect_to_vec` copies, so unaligned input is fine).
#[cfg(target_endian = "little")]
fn values_of<T: bytemuck::Pod>(b: &[u8]) -> Vec<T> {
    bytemuck::pod_collect_to_vec(b)
}

impl HostCache {
    /// Serializes the whole cache (what is attended now, nothing else).
    pub fn to_snapshot(&self) -> Result<Vec<u8>, SnapshotError> {
        let mut buffers: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
        for (i, l) in self.layers.iter().enumerate() {
            let row = l.geometry.n_kv_heads * l.geometry.head_dim;
            let (g, r) = (l.global_pos.len(), l.ring_pos.len());
            let kv = dtype_of(l.kv_type());
            let width = width_of(l.kv_type(), row);
            let mut add = |name: &str, dtype, shape: Vec<usize>, data| {
                buffers.push((format!("layers.{i}.{name}"), dtype, shape, data))
            };
            add("global_k", kv, vec![g, width], l.global_k.to_le_bytes());
            add("global_v", kv, vec![g, width], l.global_v.to_le_bytes());
            add(
                "global_pos",
                Dtype::U64,
                vec![g],
                bytes_of(&l.global_pos).to_vec(),
            );
            add("ring_k", kv, vec![r, width], l.ring_k.to_le_bytes());
            add("ring_v", kv, vec![r, width], l.ring_v.to_le_bytes());
            add(
                "ring_pos",
                Dtype::U64,
                vec![r],
                bytes_of(&l.ring_pos).to_vec(),
            );
        }
        let header = Header {
            n_global: self.params.n_global,
            n_local: self.params.n_local,
            distance_limit: self.params.distance_limit,
            next_position: self.next_position,
            seen: self.layers.iter().map(|l| l.seen).collect(),
            pinned: self.pinned.iter().map(|r| (r.start, r.end)).collect(),
        };
        let header =
            serde_json::to_string(&header).map_err(|e| SnapshotError::Format(e.to_string()))?;
        let metadata = HashMap::from([
            ("format".to_string(), FORMAT.to_string()),
            ("lambda".to_string(), header),
        ]);
        let views = buffers
            .iter()
            .map(|(name, dtype, shape, data)| {
                TensorView::new(*dtype, shape.clone(), data).map(|v| (name.clone(), v))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(safetensors::serialize(views, Some(metadata))?)
    }

    /// Rebuilds a cache saved by [`Self::to_snapshot`] for a model with `layers` geometry under
    /// `params`; anything that does not match is an error.
    pub fn from_snapshot(
        bytes: &[u8],
        params: LambdaParams,
        layers: Vec<LayerGeometry>,
    ) -> Result<Self, SnapshotError> {
        let (_, meta) = SafeTensors::read_metadata(bytes)?;
        let info = meta.metadata().clone().unwrap_or_default();
        if info.get("format").map(String::as_str) != Some(FORMAT) {
            return Err(SnapshotError::Format(format!(
                "missing format tag {FORMAT}"
            )));
        }
        let header: Header = serde_json::from_str(info.get("lambda").map_or("", String::as_str))
            .map_err(|e| SnapshotError::Format(e.to_string()))?;
        let saved = (header.n_global, header.n_local, header.distance_limit);
        let wanted = (params.n_global, params.n_local, params.distance_limit);
        if saved != wanted {
            return Err(SnapshotError::Mismatch(format!(
                "saved with (n_global, n_local, distance_limit) = {saved:?}, asked for {wanted:?}"
            )));
        }
        if header.seen.len() != layers.len() {
            return Err(SnapshotError::Mismatch(format!(
                "{} layers saved, the model has {}",
                header.seen.len(),
                layers.len()
            )));
        }
        check_counters(&header)?;
        let tensors = SafeTensors::deserialize(bytes)?;
        let mut cache = HostCache::new(params, layers);
        for (i, layer) in cache.layers.iter_mut().enumerate() {
            load_layer(&tensors, i, layer, header.seen[i])?;
            check_positions(i, layer, params)?;
        }
        // One type for every layer (a hand-made file could mix them): the first layer's.
        cache.set_kv_type(cache.kv_type());
        cache.next_position = header.next_position;
        let pinned: Vec<Range<u64>> = header.pinned.iter().map(|&(s, e)| s..e).collect();
        cache.pinned = pinned.clone();
        for layer in &mut cache.layers {
            if layer.geometry.pinnable {
                layer.pinned = pinned.clone();
                // Pins made just before saving may not have reached the global store yet.
                layer.pins_to_copy = true;
            }
        }
        Ok(cache)
    }
}

/// The counters of a snapshot must describe a cache that can exist: every layer has seen the
/// same tokens as the cache or fewer, pinned ranges are sorted, disjoint and non-empty. A stored
/// value is never trusted to index or subtract with.
fn check_counters(header: &Header) -> Result<(), SnapshotError> {
    let bad = |what: String| Err(SnapshotError::Format(what));
    if header.next_position > MAX_POSITION {
        return bad(format!(
            "next position {} is past the limit of {MAX_POSITION}",
            header.next_position
        ));
    }
    if let Some(s) = header.seen.iter().find(|&&s| s > header.next_position) {
        return bad(format!(
            "a layer has seen {s} tokens, the cache {}",
            header.next_position
        ));
    }
    // Pins may name tokens still to come (a pin made before they arrive).
    let mut end = 0;
    for &(start, stop) in &header.pinned {
        if start < end || stop <= start || stop > MAX_POSITION {
            return bad(format!(
                "pinned range {start}..{stop} is empty, out of order or past the limit"
            ));
        }
        end = stop;
    }
    Ok(())
}

/// A layer's stored positions must be where the layer would have put them: global slots
/// distinct and behind what it has seen, ring slot `s` empty or holding a position `p` with
/// `p mod window = s` among the last `window` it has seen.
fn check_positions(
    i: usize,
    layer: &HostLayerCache,
    params: LambdaParams,
) -> Result<(), SnapshotError> {
    let bad = |what: String| Err(SnapshotError::Format(format!("layer {i}: {what}")));
    let seen = layer.seen;
    let mut global = layer.global_pos.clone();
    global.sort_unstable();
    if global.windows(2).any(|w| w[0] == w[1]) || global.last().is_some_and(|&p| p >= seen) {
        return bad("global positions repeated or not seen yet".into());
    }
    let sinks = layer
        .global_pos
        .iter()
        .filter(|&&p| p < params.n_global as u64)
        .count();
    if sinks > params.n_global {
        return bad(format!("{sinks} sinks for {} places", params.n_global));
    }
    let window = layer.geometry.window as u64;
    for (slot, &p) in layer.ring_pos.iter().enumerate() {
        let fits = p == u64::MAX || (p % window == slot as u64 && p < seen && seen - p <= window);
        if !fits {
            return bad(format!("ring slot {slot} holds position {p} (seen {seen})"));
        }
    }
    Ok(())
}

/// The safetensors dtype a [`KvType`] is stored as.
fn dtype_of(kv_type: KvType) -> Dtype {
    match kv_type {
        KvType::F32 => Dtype::F32,
        KvType::F16 => Dtype::F16,
        KvType::Q8_0 => Dtype::U8,
    }
}

/// Elements of the stored tensor per slot of `row` values: values, or q8_0's bytes.
fn width_of(kv_type: KvType, row: usize) -> usize {
    match kv_type {
        KvType::Q8_0 => kv_type.stored_bytes(row),
        _ => row,
    }
}

fn load_layer(
    tensors: &SafeTensors<'_>,
    i: usize,
    layer: &mut HostLayerCache,
    seen: u64,
) -> Result<(), SnapshotError> {
    let row = layer.geometry.n_kv_heads * layer.geometry.head_dim;
    let get = |name: &str, dtype: Dtype, width: usize| -> Result<(usize, &[u8]), SnapshotError> {
        let t = tensors.tensor(&format!("layers.{i}.{name}"))?;
        let rows = t.shape().first().copied().unwrap_or(0);
        let expected: Vec<usize> = if width == 1 {
            vec![rows]
        } else {
            vec![rows, width]
        };
        if t.dtype() != dtype || t.shape() != expected.as_slice() {
            return Err(SnapshotError::Mismatch(format!(
                "layers.{i}.{name} is {:?} {:?}, expected {dtype:?} [_, {width}]",
                t.dtype(),
                t.shape()
            )));
        }
        Ok((rows, t.data()))
    };
    // The layer's keys decide its type (f32, f16 or q8_0); the other three must agree.
    let kv_type = match tensors.tensor(&format!("layers.{i}.ring_k"))?.dtype() {
        Dtype::F16 => KvType::F16,
        Dtype::U8 => KvType::Q8_0,
        _ => KvType::F32,
    };
    if !kv_type.holds_rows_of(layer.geometry.head_dim) {
        return Err(SnapshotError::Mismatch(format!(
            "layer {i} holds {kv_type} keys, which need a head size that is a multiple of 32 \
             (this model's is {})",
            layer.geometry.head_dim
        )));
    }
    let (kv, width) = (dtype_of(kv_type), width_of(kv_type, row));
    let (g, global_k) = get("global_k", kv, width)?;
    let (g_v, global_v) = get("global_v", kv, width)?;
    let (g_p, global_pos) = get("global_pos", Dtype::U64, 1)?;
    let (r, ring_k) = get("ring_k", kv, width)?;
    let (r_v, ring_v) = get("ring_v", kv, width)?;
    let (r_p, ring_pos) = get("ring_pos", Dtype::U64, 1)?;
    if g != g_v || g != g_p || r != r_v || r != r_p || r > layer.geometry.window {
        return Err(SnapshotError::Mismatch(format!(
            "layer {i}: inconsistent slot counts (global {g}/{g_v}/{g_p}, ring {r}/{r_v}/{r_p}, window {})",
            layer.geometry.window
        )));
    }
    layer.global_k = KvVec::from_le_bytes(kv_type, global_k);
    layer.global_v = KvVec::from_le_bytes(kv_type, global_v);
    layer.global_pos = values_of(global_pos);
    layer.ring_k = KvVec::from_le_bytes(kv_type, ring_k);
    layer.ring_v = KvVec::from_le_bytes(kv_type, ring_v);
    layer.ring_pos = values_of(ring_pos);
    layer.seen = seen;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attention::{AttentionCache, AttentionInput, Rope, RopeStyle};

    fn feed(cache: &mut HostCache, rope: &Rope, values: &[f32]) -> Vec<f32> {
        let mut out = Vec::new();
        for x in values.chunks(cache.layers[0].geometry.head_dim) {
            let input = AttentionInput {
                q: x,
                k: x,
                v: x,
                n_tokens: 1,
                n_heads: 1,
                rope,
                scale: 0.5,
            };
            for layer in 0..2 {
                out.extend(cache.attend(layer, &input).unwrap());
            }
            cache.advance(1);
        }
        out
    }

    #[test]
    fn a_restored_cache_continues_exactly() {
        let params = LambdaParams::new(2, 8, None).unwrap();
        let geometry = vec![LayerGeometry::full(params, 1, 4); 2];
        let rope = Rope::new(4, 10_000.0, RopeStyle::Neox);
        let tokens: Vec<f32> = (0..4 * 40)
            .map(|i| ((i * 37 % 17) as f32 - 8.0) / 5.0)
            .collect();
        let mut original = HostCache::new(params, geometry.clone());
        feed(&mut original, &rope, &tokens[..4 * 25]);
        original.pin(20..22);
        let bytes = original.to_snapshot().unwrap();
        let mut restored = HostCache::from_snapshot(&bytes, params, geometry.clone()).unwrap();
        assert_eq!(restored.stats(), original.stats());
        assert_eq!(restored.pinned(), original.pinned());
        let a = feed(&mut original, &rope, &tokens[4 * 25..]);
        let b = feed(&mut restored, &rope, &tokens[4 * 25..]);
        assert_eq!(a, b);

        let other = LambdaParams::new(2, 16, None).unwrap();
        let err = HostCache::from_snapshot(&bytes, other, geometry).unwrap_err();
        assert!(matches!(err, SnapshotError::Mismatch(_)), "{err}");
        let err = HostCache::from_snapshot(b"garbage", params, vec![]).unwrap_err();
        assert!(matches!(err, SnapshotError::Format(_)), "{err}");
    }

    /// An f16 cache saves its keys and values as f16 (half the bytes) and restores as f16,
    /// continuing exactly; converted to f32 after the restore it continues within f16's
    /// rounding.
    #[test]
    fn an_f16_cache_restores_as_f16_and_converts() {
        let params = LambdaParams::new(2, 8, None).unwrap();
        let geometry = vec![LayerGeometry::full(params, 1, 4); 2];
        let rope = Rope::new(4, 10_000.0, RopeStyle::Neox);
        let tokens: Vec<f32> = (0..4 * 40)
            .map(|i| ((i * 37 % 17) as f32 - 8.0) / 5.0)
            .collect();
        let mut sizes = Vec::new();
        let mut halves = Vec::new();
        for kv_type in [KvType::F32, KvType::F16] {
            let mut original = HostCache::new(params, geometry.clone());
            original.set_kv_type(kv_type);
            feed(&mut original, &rope, &tokens[..4 * 25]);
            let bytes = original.to_snapshot().unwrap();
            sizes.push(bytes.len());
            let mut restored = HostCache::from_snapshot(&bytes, params, geometry.clone()).unwrap();
            assert_eq!(restored.kv_type(), kv_type);
            let mut widened = restored.clone();
            widened.set_kv_type(KvType::F32);
            let a = feed(&mut original, &rope, &tokens[4 * 25..]);
            let b = feed(&mut restored, &rope, &tokens[4 * 25..]);
            assert_eq!(a, b, "{kv_type:?}");
            let c = feed(&mut widened, &rope, &tokens[4 * 25..]);
            let err = a
                .iter()
                .zip(&c)
                .map(|(a, c)| (a - c).abs())
                .fold(0.0, f32::max);
            assert!(err < 2e-3, "{kv_type:?} widened: max |Δ| = {err}");
            halves.push(a);
        }
        // Two bytes fewer per value: 2 layers × (2 sinks + 8 ring slots) × 4 values × (k, v).
        assert_eq!(sizes[0] - sizes[1], 2 * 2 * 10 * 4 * 2, "{sizes:?}");
        let err = halves[0]
            .iter()
            .zip(&halves[1])
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(err > 0.0 && err < 2e-3, "f16 against f32: max |Δ| = {err}");
    }

    /// A q8_0 cache saves GGML's 34-byte blocks and restores as q8_0, continuing exactly; a
    /// model whose head size is not whole blocks refuses it.
    #[test]
    fn a_q8_0_cache_restores_as_q8_0() {
        let params = LambdaParams::new(2, 8, None).unwrap();
        let geometry = vec![LayerGeometry::full(params, 1, 32); 2];
        let rope = Rope::new(32, 10_000.0, RopeStyle::Neox);
        let tokens: Vec<f32> = (0..32 * 30)
            .map(|i| ((i * 37 % 17) as f32 - 8.0) / 5.0)
            .collect();
        let mut original = HostCache::new(params, geometry.clone());
        original.set_kv_type(KvType::Q8_0);
        feed(&mut original, &rope, &tokens[..32 * 20]);
        original.pin(12..13);
        let bytes = original.to_snapshot().unwrap();
        let mut restored = HostCache::from_snapshot(&bytes, params, geometry.clone()).unwrap();
        assert_eq!(restored.kv_type(), KvType::Q8_0);
        assert_eq!(restored.stats(), original.stats());
        let a = feed(&mut original, &rope, &tokens[32 * 20..]);
        let b = feed(&mut restored, &rope, &tokens[32 * 20..]);
        assert_eq!(a, b);
        let halves = vec![LayerGeometry::full(params, 2, 16); 2];
        let err = HostCache::from_snapshot(&bytes, params, halves).unwrap_err();
        assert!(
            matches!(err, SnapshotError::Mismatch(ref m) if m.contains("multiple of 32")),
            "{err}"
        );
    }

    /// Counters and positions a cache could not have are refused, not trusted: a ring position
    /// in the wrong slot or ahead of what was seen, a layer ahead of the cache, pins out of
    /// order or past the end.
    #[test]
    fn impossible_counters_and_positions_are_refused() {
        let params = LambdaParams::new(2, 8, None).unwrap();
        let geometry = vec![LayerGeometry::full(params, 1, 4); 2];
        let rope = Rope::new(4, 10_000.0, RopeStyle::Neox);
        let tokens: Vec<f32> = (0..4 * 20).map(|i| (i % 7) as f32 / 7.0).collect();
        let mut original = HostCache::new(params, geometry.clone());
        feed(&mut original, &rope, &tokens);
        original.pin(10..12);
        let tamper = |f: &dyn Fn(&mut HostCache)| {
            let mut c = original.clone();
            f(&mut c);
            HostCache::from_snapshot(&c.to_snapshot().unwrap(), params, geometry.clone())
        };
        assert!(tamper(&|_| {}).is_ok());
        let cases: [&dyn Fn(&mut HostCache); 6] = [
            &|c| c.layers[0].ring_pos[3] = 4,
            &|c| c.layers[0].ring_pos[3] = 3 + 8 * 100,
            &|c| c.layers[1].seen = c.next_position + 1,
            &|c| c.layers[0].global_pos[1] = c.layers[0].global_pos[0],
            &|c| c.pinned = vec![12..14, 10..12],
            &|c| c.pinned = std::iter::once(14..14).collect(),
        ];
        for (n, case) in cases.iter().enumerate() {
            let err = tamper(case).unwrap_err();
            assert!(matches!(err, SnapshotError::Format(_)), "case {n}: {err}");
        }
    }
}
