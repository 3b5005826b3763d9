<script>
// Small page behaviours Gradio has no setting for. Plain script, no dependencies, no network.
(() => {
  const NARROW = "(max-width: 768px)";
  const narrow = () => window.matchMedia(NARROW).matches;
  const sidebar = () => document.querySelector(".sidebar");
  const closeSidebar = () => {
    const panel = sidebar();
    if (panel && panel.classList.contains("open")) panel.querySelector(".toggle-button")?.click();
  };
  let fitted = false;
  setInterval(() => {
    // On a phone the conversation panel starts closed (it covers the whole page).
    if (!fitted && sidebar()) {
      fitted = true;
      if (narrow()) closeSidebar();
    }
    // The status line is a polite live region: "Thinking…" and "Reply finished." are read out once.
    const status = document.getElementById("reply-status");
    if (status && !status.hasAttribute("role")) {
      status.setAttribute("role", "status");
      status.setAttribute("aria-live", "polite");
    }
    // Gradio shows chat photos as buttons without a name: name them after the photo ("Photo 1").
    document.querySelectorAll(".image-container > button:not([aria-label])").forEach((button) => {
      const alt = button.querySelector("img")?.getAttribute("alt");
      button.setAttribute("aria-label", `Enlarge ${alt || "the photo"}`);
    });
    // Elapsed seconds beside "Thinking…" / "Waiting…" (hidden from screen readers: it changes every second).
    document.querySelectorAll("#reply-status [data-elapsed]").forEach((el) => {
      el.dataset.start = el.dataset.start || String(Date.now());
      el.textContent = ` ${Math.floor((Date.now() - Number(el.dataset.start)) / 1000)} s`;
    });
  }, 250);
  // Picking a conversation on a phone closes the panel, so the chat shows; the one already open too
  // (a reload reopens it), which fires no change. A label's click reaches its radio once; keys click it too.
  document.addEventListener("click", (event) => {
    if (narrow() && event.target.matches && event.target.matches("#conversation-list input")) closeSidebar();
  });
})();
</script>
