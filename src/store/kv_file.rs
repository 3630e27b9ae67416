//! A conversation's cache on disk, written in place: one slot per token position for the last
//! `n_local + 1` positions (slot = position mod slots), each slot every layer's keys and values
//! of its token. A save writes the slots of the tokens fed since the last one — bytes in
//! proportion to the new tokens, never the whole window — and the file never grows.
//!
//! Layout: a 4 KiB header (magic, the slot size and count, the element type), a table of one
//! 16-byte entry per slot (the position it holds, a CRC-32 of its data, whether every layer
//! had it), then the slots. Each position is written data first, entry second: a process killed at any moment
//! leaves a whole window ending at the last position written (the slot being written held a
//! position one past the oldest that window needs: hence `n_local + 1` slots).
//!
//! Values are stored as the cache holds them ([`KvType`]): an f16 cache writes half the bytes
//! of an f32 one, a q8_0 cache GGML's 34-byte blocks, and since what the cache held goes
//! through the f32 slots it hands over and back to the same bytes, nothing is lost on the
//! way. Files written before the element type existed have zeros where it sits, which reads
//! as f32, as they are.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::attention::KvType;

const MAGIC: &[u8; 8] = b"LCKVRNG1";
const HEADER: u64 = 4096;
const ENTRY: u64 = 16;
const EMPTY: u64 = u64::MAX;
/// Values per slot past which a header is damage, not a model (a slot is one token's keys and
/// values over every layer: about 6,000 for the default model).
const MAX_SLOT_FLOATS: usize = 1 << 32;

/// The table entry of a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub position: u64,
    pub crc: u32,
    /// Every layer held the token when it was written.
    pub complete: bool,
}

/// An open KV file.
pub struct KvFile {
    file: File,
    path: PathBuf,
    slot_floats: u64,
    slots: u64,
    kv_type: KvType,
    table: Vec<Entry>,
}

#[derive(Debug, thiserror::Error)]
pub enum KvFileError {
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
}

impl KvFile {
    fn data_offset(&self) -> u64 {
        (HEADER + self.slots * ENTRY).div_ceil(4096) * 4096
    }

    fn slot_bytes(&self) -> u64 {
        self.kv_type.stored_bytes(self.slot_floats as usize) as u64
    }

    /// Creates (or empties) the file for slots of `slot_floats` values stored as `kv_type`,
    /// `slots` of them.
    pub fn create(
        path: &Path,
        slot_floats: usize,
        slots: u64,
        kv_type: KvType,
    ) -> Result<Self, KvFileError> {
        let err = |e| KvFileError::Io(path.to_path_buf(), e);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(err)?;
        let mut header = vec![0u8; HEADER as usize];
        header[..8].copy_from_slice(MAGIC);
        header[8..16].copy_from_slice(&(slot_floats as u64).to_le_bytes());
        header[16..24].copy_from_slice(&slots.to_le_bytes());
        header[24..32].copy_from_slice(&type_code(kv_type).to_le_bytes());
        file.write_all(&header).map_err(err)?;
        let empty = Entry {
            position: EMPTY,
            crc: 0,
            complete: false,
        };
        let table: Vec<u8> = (0..slots).flat_map(|_| encode(empty)).collect();
        file.write_all(&table).map_err(err)?;
        file.sync_all().map_err(err)?;
        Ok(Self {
            file,
            path: path.to_path_buf(),
            slot_floats: slot_floats as u64,
            slots,
            kv_type,
            table: vec![empty; slots as usize],
        })
    }

    /// Opens the file when it has this layout, with values of any type (they are read as f32);
    /// `None` when it is missing or another layout.
    pub fn open(path: &Path, slot_floats: usize, slots: u64) -> Result<Option<Self>, KvFileError> {
        Ok(Self::open_any(path)?
            .filter(|f| f.slot_floats == slot_floats as u64 && f.slots == slots))
    }

    /// Opens the file when it has this layout and stores values as `kv_type` (what a save
    /// writes into: a cache of another type starts a new file).
    pub fn open_as(
        path: &Path,
        slot_floats: usize,
        slots: u64,
        kv_type: KvType,
    ) -> Result<Option<Self>, KvFileError> {
        Ok(Self::open(path, slot_floats, slots)?.filter(|f| f.kv_type == kv_type))
    }

    /// Opens the file whatever its layout; `None` when it is missing or not a KV file.
    fn open_any(path: &Path) -> Result<Option<Self>, KvFileError> {
        let err = |e| KvFileError::Io(path.to_path_buf(), e);
        let mut file = match OpenOptions::new().read(true).write(true).open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(err(e)),
        };
        let mut header = vec![0u8; HEADER as usize];
        if file.read_exact(&mut header).is_err() {
            return Ok(None);
        }
        let word = |at: usize| u64::from_le_bytes(header[at..at + 8].try_into().unwrap_or([0; 8]));
        let (slot_floats, slots) = (word(8), word(16));
        let Some(kv_type) = type_of(word(24)) else {
            return Ok(None);
        };
        if &header[..8] != MAGIC
            || slot_floats == 0
            || slot_floats > MAX_SLOT_FLOATS as u64
            || !kv_type.holds_rows_of(slot_floats as usize)
            || slots == 0
            || slots > 1 << 24
        {
            return Ok(None);
        }
        let mut table = vec![0u8; (slots * ENTRY) as usize];
        file.seek(SeekFrom::Start(HEADER)).map_err(err)?;
        if file.read_exact(&mut table).is_err() {
            return Ok(None);
        }
        let table = table.chunks_exact(ENTRY as usize).map(decode).collect();
        Ok(Some(Self {
            file,
            path: path.to_path_buf(),
            slot_floats,
            slots,
            kv_type,
            table,
        }))
    }

    /// Forgets, durably, every position from `position` on in the file at `path` (when there is
    /// one): a regenerated reply's tokens will take those positions with other keys and values.
    pub fn forget_from(path: &Path, position: u64) -> Result<(), KvFileError> {
        let Some(mut file) = Self::open_any(path)? else {
            return Ok(());
        };
        let empty = Entry {
            position: EMPTY,
            crc: 0,
            complete: false,
        };
        let mut changed = false;
        for slot in 0..file.slots {
            let held = file.table[slot as usize].position;
            if held != EMPTY && held >= position {
                file.file
                    .write_all_at(&encode(empty), HEADER + slot * ENTRY)
                    .map_err(|e| KvFileError::Io(file.path.clone(), e))?;
                file.table[slot as usize] = empty;
                changed = true;
            }
        }
        if changed {
            file.sync()?;
        }
        Ok(())
    }

    /// The bytes one token takes in the file at `path` (every layer's keys and values), from its
    /// header; `None` when it is not a KV file.
    pub fn token_bytes(path: &Path) -> Option<u64> {
        let mut header = [0u8; 32];
        File::open(path).ok()?.read_exact(&mut header).ok()?;
        let floats = u64::from_le_bytes(header[8..16].try_into().ok()?);
        let kv_type = type_of(u64::from_le_bytes(header[24..32].try_into().ok()?))?;
        let floats = usize::try_from(floats)
            .ok()
            .filter(|&f| f <= MAX_SLOT_FLOATS)?;
        (&header[..8] == MAGIC).then_some(kv_type.stored_bytes(floats) as u64)
    }

    /// What slot `position` would sit in holds now.
    pub fn entry(&self, position: u64) -> Entry {
        self.table[(position % self.slots) as usize]
    }

    /// Writes position `position`'s slot (`data` as f32, stored as the file's type): data
    /// first, then its entry.
    pub fn write(
        &mut self,
        position: u64,
        data: &[f32],
        complete: bool,
    ) -> Result<(), KvFileError> {
        let err = |e| KvFileError::Io(self.path.clone(), e);
        let slot = position % self.slots;
        let bytes = &self.kv_type.encode(data);
        debug_assert_eq!(bytes.len() as u64, self.slot_bytes());
        self.file
            .write_all_at(bytes, self.data_offset() + slot * self.slot_bytes())
            .map_err(err)?;
        let entry = Entry {
            position,
            crc: crc32fast::hash(bytes),
            complete,
        };
        self.file
            .write_all_at(&encode(entry), HEADER + slot * ENTRY)
            .map_err(err)?;
        self.table[slot as usize] = entry;
        Ok(())
    }

    /// Makes what was written durable.
    pub fn sync(&self) -> Result<(), KvFileError> {
        self.file
            .sync_data()
            .map_err(|e| KvFileError::Io(self.path.clone(), e))
    }

    /// Position `position`'s slot, when the table says the file holds it and its data checks.
    pub fn read(&self, position: u64) -> Option<Vec<f32>> {
        let entry = self.entry(position);
        if entry.position != position {
            return None;
        }
        let slot = position % self.slots;
        let mut bytes = vec![0u8; self.slot_bytes() as usize];
        self.file
            .read_exact_at(&mut bytes, self.data_offset() + slot * self.slot_bytes())
            .ok()?;
        if crc32fast::hash(&bytes) != entry.crc {
            return None;
        }
        Some(self.kv_type.decode(&bytes))
    }

    /// The latest window end in `from..=to` the table vouches for: every position of the
    /// `widest` before it present, the last `narrowest` of them complete.
    pub fn best_end(&self, from: u64, to: u64, widest: u64, narrowest: u64) -> Option<u64> {
        // An end is at most one past the newest position held, and no further back than the
        // file's slots reach: a few candidates, however far apart `from` and `to` are.
        let newest = self
            .table
            .iter()
            .map(|e| e.position)
            .filter(|&p| p != EMPTY)
            .max()?;
        let to = to.min(newest + 1);
        let from = from.max(to.saturating_sub(self.slots));
        (from..=to).rev().find(|&end| {
            (end.saturating_sub(widest)..end).all(|p| {
                let e = self.entry(p);
                e.position == p && (e.complete || p + narrowest < end)
            })
        })
    }
}

/// The header's word for an element type (0, what files before it have there, is f32).
fn type_code(kv_type: KvType) -> u64 {
    match kv_type {
        KvType::F32 => 0,
        KvType::F16 => 1,
        KvType::Q8_0 => 2,
    }
}

fn type_of(code: u64) -> Option<KvType> {
    match code {
        0 => Some(KvType::F32),
        1 => Some(KvType::F16),
        2 => Some(KvType::Q8_0),
        _ => None,
    }
}

fn encode(e: Entry) -> [u8; ENTRY as usize] {
    let mut b = [0u8; ENTRY as usize];
    b[..8].copy_from_slice(&e.position.to_le_bytes());
    b[8..12].copy_from_slice(&e.crc.to_le_bytes());
    b[12] = e.complete as u8;
    b
}

fn decode(b: &[u8]) -> Entry {
    Entry {
        position: u64::from_le_bytes(b[..8].try_into().unwrap_or([0xff; 8])),
        crc: u32::from_le_bytes(b[8..12].try_into().unwrap_or([0; 4])),
        complete: b[12] == 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::f16;

    #[test]
    fn slots_wrap_and_a_window_survives_a_torn_save() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.kv");
        let mut f = KvFile::create(&path, 4, 5, KvType::F32).unwrap();
        let slot = |p: u64| vec![p as f32; 4];
        for p in 0..7 {
            f.write(p, &slot(p), true).unwrap();
        }
        // Five slots hold 2..7: a window of four ends at 6 or 7.
        assert_eq!(f.best_end(0, 7, 4, 4), Some(7));
        assert_eq!(f.read(6), Some(slot(6)));
        assert_eq!(f.read(1), None, "overwritten by 6");
        // Position 7's data written, its entry not (killed in between): 7's slot still says 2,
        // whose data no longer checks, but the window ending at 7 does not need 2.
        let torn = slot(7);
        let bytes: &[u8] = bytemuck::cast_slice(&torn);
        f.file
            .write_all_at(bytes, f.data_offset() + 2 * 16)
            .unwrap();
        let reopened = KvFile::open(&path, 4, 5).unwrap().unwrap();
        assert_eq!(reopened.entry(6).position, 6);
        assert_eq!(reopened.read(2), None, "torn");
        assert_eq!(reopened.best_end(0, 8, 4, 4), Some(7));
        assert!(
            KvFile::open(&path, 8, 5).unwrap().is_none(),
            "another layout"
        );
        assert!(
            KvFile::open(&dir.path().join("none"), 4, 5)
                .unwrap()
                .is_none()
        );
        // Partial slots serve only windows they are older than.
        f.write(7, &slot(7), false).unwrap();
        assert_eq!(
            f.best_end(0, 8, 4, 1),
            Some(7),
            "7 is not needed complete for 7"
        );
        assert_eq!(f.best_end(8, 8, 4, 1), None);
    }

    #[test]
    fn forgotten_positions_serve_no_window_and_the_search_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.kv");
        let mut f = KvFile::create(&path, 4, 5, KvType::F32).unwrap();
        for p in 0..7 {
            f.write(p, &[p as f32; 4], true).unwrap();
        }
        KvFile::forget_from(&path, 5).unwrap();
        KvFile::forget_from(&dir.path().join("none.kv"), 5).unwrap();
        let f = KvFile::open(&path, 4, 5).unwrap().unwrap();
        assert_eq!(f.read(5), None);
        assert_eq!(f.read(4), Some(vec![4.0; 4]));
        // Held: 2, 3, 4. A conversation a billion tokens long asks in no time.
        assert_eq!(f.best_end(0, 1_000_000_000, 3, 3), Some(5));
        assert_eq!(
            f.best_end(0, 1_000_000_000, 4, 4),
            Some(0),
            "only the empty window"
        );
    }

    #[test]
    fn an_f16_file_takes_half_the_bytes_and_gives_back_what_an_f16_cache_holds() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.kv");
        // Values an f16 cache holds (already rounded to f16), and one that is not.
        let held: Vec<f32> = (0..8)
            .map(|i| f16::from_f32(i as f32 * 0.3 - 1.1).to_f32())
            .collect();
        let mut f = KvFile::create(&path, 8, 3, KvType::F16).unwrap();
        f.write(0, &held, true).unwrap();
        f.write(1, &[1.0 / 3.0; 8], true).unwrap();
        f.sync().unwrap();
        assert_eq!(KvFile::token_bytes(&path), Some(16));
        let f = KvFile::open(&path, 8, 3).unwrap().unwrap();
        assert_eq!(f.read(0), Some(held), "f16 → f32 → f16 is exact");
        assert_eq!(f.read(1), Some(vec![f16::from_f32(1.0 / 3.0).to_f32(); 8]));
        // A save of an f32 cache does not write into it, and neither takes the other's file.
        assert!(KvFile::open_as(&path, 8, 3, KvType::F32).unwrap().is_none());
        assert!(KvFile::open_as(&path, 8, 3, KvType::F16).unwrap().is_some());
        let f32_path = dir.path().join("f32.kv");
        KvFile::create(&f32_path, 8, 3, KvType::F32).unwrap();
        assert_eq!(KvFile::token_bytes(&f32_path), Some(32));
        assert!(
            KvFile::open_as(&f32_path, 8, 3, KvType::F16)
                .unwrap()
                .is_none()
        );
        // An unknown type in the header is not a KV file of ours.
        let mut header = std::fs::read(&path).unwrap();
        header[24] = 7;
        std::fs::write(&path, &header).unwrap();
        assert!(KvFile::open(&path, 8, 3).unwrap().is_none());
        assert_eq!(KvFile::token_bytes(&path), None);
    }

    #[test]
    fn a_q8_0_file_stores_ggml_blocks_and_gives_back_what_a_q8_0_cache_holds() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.kv");
        // What a q8_0 cache hands over: values already on its grid.
        let raw: Vec<f32> = (0..64).map(|i| (i as f32 * 0.37).sin()).collect();
        let held = KvType::Q8_0.decode(&KvType::Q8_0.encode(&raw));
        assert_ne!(held, raw);
        let mut f = KvFile::create(&path, 64, 3, KvType::Q8_0).unwrap();
        f.write(0, &held, true).unwrap();
        f.sync().unwrap();
        assert_eq!(KvFile::token_bytes(&path), Some(2 * 34));
        let f = KvFile::open(&path, 64, 3).unwrap().unwrap();
        assert_eq!(
            f.read(0),
            Some(held),
            "a held row requantizes to its own bytes"
        );
        assert!(
            KvFile::open_as(&path, 64, 3, KvType::F16)
                .unwrap()
                .is_none()
        );
        assert!(
            KvFile::open_as(&path, 64, 3, KvType::Q8_0)
                .unwrap()
                .is_some()
        );
        // A q8_0 header whose slots are not whole blocks is damage, not a file to use.
        KvFile::create(&path, 48, 3, KvType::Q8_0).unwrap();
        assert!(KvFile::open(&path, 48, 3).unwrap().is_none());
    }
}
