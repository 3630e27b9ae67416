//! The chat screen's panels. Each is one module with its state, the keys it reads and how it
//! draws; `App` composes them, routes keys to the one in front, and `view` lays them out.
//!
//! A new panel is one module here, its keys in the keymap's table (a `Context` of its own), a
//! field (or overlay) in `App` and a place in `view::draw`.

pub mod conversation;
pub mod help;
pub mod input;
pub mod inspect;
pub mod sessions;
pub mod visualizer;
