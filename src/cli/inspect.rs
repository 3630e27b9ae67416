//! `lambdachat inspect`: what a model holds, before running it.

use anyhow::Result;
use clap::Args;

use super::{ModelArgs, resolve_model};
use crate::engine::Engine;

#[derive(Args)]
pub struct InspectArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Model: GGUF file, model directory or hf:ORG/REPO (same as --model)
    pub path: Option<std::path::PathBuf>,
    /// Also print the chat template
    #[arg(long)]
    pub template: bool,
}

pub fn run(args: InspectArgs) -> Result<i32> {
    let options = args.model.load_options()?;
    let path = resolve_model(
        args.path.as_deref().or(args.model.model.as_deref()),
        &crate::progress::Stderr,
    )?;
    let engine = Engine::load_with(&path, options)?;
    let info = engine.model.info();
    let size = if path.is_dir() {
        crate::hub::dir_size(&path)
    } else {
        std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0)
    };
    println!(
        "file            {} ({:.1} MB)",
        path.display(),
        size as f64 / 1e6
    );
    println!("name            {}", info.name);
    println!("architecture    {}", info.architecture);
    println!(
        "layers          {} (hidden {}, {} heads, {} KV heads, head dim {})",
        info.n_layers, info.hidden_size, info.n_heads, info.n_kv_heads, info.head_dim
    );
    println!("vocabulary      {} tokens", info.vocab_size);
    println!("context length  {} (training)", info.context_length);
    if let Some(w) = info.sliding_window {
        println!("sliding window  {w}");
    }
    println!("rope base       {}", info.rope_theta);
    let quant: Vec<String> = engine
        .quant
        .iter()
        .map(|(d, n)| format!("{d}×{n}"))
        .collect();
    println!("weights         {}", quant.join(", "));
    let tok = &engine.tokenizer;
    let name = |id: Option<u32>| {
        id.and_then(|i| tok.id_to_token(i).map(|t| format!("{t} ({i})")))
            .unwrap_or_else(|| "none".into())
    };
    println!(
        "tokenizer       {} tokens, bos {}, eos {}, add bos: {}",
        tok.vocab_size(),
        name(tok.bos),
        name(tok.eos),
        tok.add_bos
    );
    let stops: Vec<String> = engine.stop_ids.iter().map(|i| name(Some(*i))).collect();
    println!("stop tokens     {}", stops.join(", "));
    println!(
        "chat template   {}",
        if engine.template.is_fallback() {
            format!(
                "none in the file: {} is used",
                if engine.template.source() == crate::chat::template::GEMMA {
                    "Gemma's turn format"
                } else {
                    "ChatML"
                }
            )
        } else {
            format!("from the file ({} bytes)", engine.template.source().len())
        }
    );
    if args.template {
        println!("{}", engine.template.source());
    }
    println!("load time       {:.2}s", engine.load_time.as_secs_f64());
    Ok(0)
}
