use clap::Parser;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,rdkafka=warn")))
        .with_writer(std::io::stderr)
        .init();
    let cli = switchyard::cli::Cli::parse();
    switchyard::cli::run(cli).await?;
    Ok(())
}
