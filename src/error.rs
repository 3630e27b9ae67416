//! Error helpers every layer shares. It sits at the bottom of the module graph (it imports
//! nothing of the crate), so the model-independent core can use it without depending on models.

/// A candle error's message without the backtrace candle appends when `RUST_BACKTRACE` is set:
/// users get one line.
pub fn candle_msg(e: &impl std::fmt::Display) -> String {
    let s = e.to_string();
    s.lines().next().unwrap_or_default().trim().to_string()
}
