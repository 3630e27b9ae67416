fn main() {
    let cli = lambdachat::cli::parse();
    lambdachat::logging::init();
    let code = match lambdachat::cli::run(cli) {
        Ok(code) => code,
        Err(e) => {
            tracing::error!("exiting: {e:#}");
            eprintln!("lambdachat: error: {e:#}");
            1
        }
    };
    lambdachat::logging::finish();
    std::process::exit(code);
}
