// Refresh the status page in place every 5 s (no flicker, scroll position kept).
(function () {
  "use strict";
  async function refresh() {
    try {
      const r = await fetch(window.location.pathname + window.location.search, { cache: "no-store" });
      if (!r.ok) return;
      const doc = new DOMParser().parseFromString(await r.text(), "text/html");
      for (const id of ["content", "ready", "generated"]) {
        const fresh = doc.getElementById(id), old = document.getElementById(id);
        if (fresh && old) old.replaceWith(fresh);
      }
    } catch (e) { /* daemon restarting: try again next tick */ }
  }
  setInterval(refresh, 5000);
})();
