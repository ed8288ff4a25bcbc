fn main() -> std::process::ExitCode {
    m2m_listener::memory::return_large_buffers_to_the_system();
    m2m_listener::cli::run()
}
