//! Bytes as a model file: open → load (tokenizer, template, weights packed for our kernels) →
//! one forward. Anything but a clean error is a defect: a panic, an allocation past the
//! fuzzer's memory limit, a hang.
#![no_main]

use std::sync::Arc;

use lambdachat::attention::LambdaParams;
use lambdachat::engine::Engine;
use lambdachat::sampling::SamplingParams;
use lambdachat::session::Session;
use lambdachat_fuzz::scratch;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = scratch("input.gguf");
    std::fs::write(&path, data).expect("scratch write");
    let Ok(engine) = Engine::load(&path) else {
        return;
    };
    let Ok(params) = LambdaParams::new(2, 8, None) else {
        return;
    };
    let Ok(mut session) = Session::new(Arc::new(engine), params, SamplingParams::default(), None)
    else {
        return;
    };
    let _ = session.feed(&[0, 1, 2]);
});
