fn main() -> std::process::ExitCode {
    m2m_listener::cli::run()
}
