//! A config file's text → parse → what the chat builds from it (theme, keymap, Λ parameters,
//! sampling), each either accepted or refused with an error that points into the text.
#![no_main]

use std::path::Path;

use lambdachat::attention::LambdaParams;
use lambdachat::config::Config;
use lambdachat::sampling::SamplingParams;
use lambdachat::tui::keymap::Keymap;
use lambdachat::tui::theme::Theme;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    let Ok(config) = Config::parse(text, Path::new("config.toml")) else {
        return;
    };
    let _ = Theme::from_config(&config).map_err(|e| e.to_string());
    let _ = Keymap::from_config(&config).map_err(|e| e.to_string());
    let lambda = &config.lambda;
    let _ = LambdaParams::new(
        lambda.n_global.unwrap_or(64),
        lambda.n_local.unwrap_or(4096),
        lambda.distance_limit,
    );
    let (s, d) = (&config.sampling, SamplingParams::default());
    let sampling = SamplingParams {
        temperature: s.temperature.unwrap_or(d.temperature),
        top_k: s.top_k.unwrap_or(d.top_k),
        top_p: s.top_p.unwrap_or(d.top_p),
        min_p: s.min_p.unwrap_or(d.min_p),
        repeat_penalty: s.repeat_penalty.unwrap_or(d.repeat_penalty),
        seed: s.seed.unwrap_or(d.seed),
        ..d
    };
    let _ = sampling.validate();
});
