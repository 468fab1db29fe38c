use clap::Parser;
use tracing_subscriber::EnvFilter;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,rdkafka=warn")))
        .with_writer(std::io::stderr)
        // Colours for a terminal; plain text for log files and collectors (greppable: `rebuilt=0`).
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = switchyard::cli::Cli::parse();
    match switchyard::cli::run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            // The message says what went wrong and what to check; a backtrace would only bury it.
            eprintln!("error: {error}");
            std::process::ExitCode::FAILURE
        }
    }
}
