//! Faults injected on purpose, compiled only with the `faults` feature (the tests turn it on):
//! a model forward that fails or panics when a countdown runs out, to show that a failed turn
//! puts the conversation back and that a panic in generation leaves the terminal and the saved
//! conversation whole. Release builds have none of this.

use std::cell::Cell;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::ThreadId;

/// What an armed forward does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Returns an error, as a device out of memory would.
    Error,
    /// Panics, as a bug would.
    Panic,
}

/// Where a fault armed for a turn strikes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TurnFault {
    /// The turn's first forward panics, on the thread that runs the turn.
    Panic,
    /// A task of the compute pool panics during the turn's first forward.
    PoolPanic,
}

thread_local! {
    static FORWARD: Cell<Option<(u32, Fault)>> = const { Cell::new(None) };
    static TURN: Cell<Option<(u32, TurnFault)>> = const { Cell::new(None) };
}

/// A pool task panics once this is set, on a thread other than [`TURN_THREAD`].
static POOL_PANIC: AtomicBool = AtomicBool::new(false);
static TURN_THREAD: Mutex<Option<ThreadId>> = Mutex::new(None);

/// Makes the forward after `forwards` more on this thread fail with `fault` (once).
pub fn arm_forward(forwards: u32, fault: Fault) {
    FORWARD.with(|f| f.set(Some((forwards, fault))));
}

/// Arms this thread from `LAMBDACHAT_FAULT`, for tests that drive the binary:
/// `forward-error:N` / `forward-panic:N` (the forward after N more), `turn-panic:T` (the first
/// forward of turn T, counting from 1), `pool-panic:T` (a compute pool task in that forward).
pub fn arm_from_env() {
    let Ok(spec) = std::env::var("LAMBDACHAT_FAULT") else {
        return;
    };
    let (kind, count) = spec.split_once(':').unwrap_or((spec.as_str(), "0"));
    let count: u32 = count.parse().unwrap_or(0);
    match kind {
        "forward-error" => arm_forward(count, Fault::Error),
        "forward-panic" => arm_forward(count, Fault::Panic),
        "turn-panic" => TURN.with(|t| t.set(Some((count, TurnFault::Panic)))),
        "pool-panic" => TURN.with(|t| t.set(Some((count, TurnFault::PoolPanic)))),
        _ => {}
    }
}

/// Called as a turn starts: counts turns, and arms the turn's fault when due.
pub fn on_turn() {
    let Some((left, fault)) = TURN.with(Cell::get) else {
        return;
    };
    if left > 1 {
        TURN.with(|t| t.set(Some((left - 1, fault))));
        return;
    }
    TURN.with(|t| t.set(None));
    match fault {
        TurnFault::Panic => arm_forward(0, Fault::Panic),
        TurnFault::PoolPanic => {
            if let Ok(mut t) = TURN_THREAD.lock() {
                *t = Some(std::thread::current().id());
            }
            POOL_PANIC.store(true, Ordering::SeqCst);
        }
    }
}

/// Called in each compute pool task: panics once when armed, on a thread other than the one
/// running the turn.
pub fn on_pool_task() {
    if !POOL_PANIC.load(Ordering::SeqCst) {
        return;
    }
    let turn = TURN_THREAD.lock().ok().and_then(|t| *t);
    let elsewhere = turn != Some(std::thread::current().id());
    if elsewhere && POOL_PANIC.swap(false, Ordering::SeqCst) {
        panic!("injected fault: a compute pool task panicked");
    }
}

/// Called before each forward: counts down, and fires when armed and due.
pub fn on_forward() -> Result<(), String> {
    let Some((left, fault)) = FORWARD.with(Cell::get) else {
        return Ok(());
    };
    if left > 0 {
        FORWARD.with(|f| f.set(Some((left - 1, fault))));
        return Ok(());
    }
    FORWARD.with(|f| f.set(None));
    match fault {
        Fault::Error => Err("injected fault: the forward failed".into()),
        Fault::Panic => panic!("injected fault: the forward panicked"),
    }
}
