fn main() {
    let cli = lambdachat::cli::parse();
    lambdachat::logging::init();
    match lambdachat::cli::run(cli) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("lambdachat: error: {e:#}");
            std::process::exit(1);
        }
    }
}
