// sync-daemon Manage page: live refresh of the panels by fetching server-rendered HTML
// fragments. No build step, no framework; without this script the page still works (it just
// does not refresh by itself).
(function () {
  "use strict";
  var live = document.getElementById("live");

  function setLive(ok) {
    if (!live) return;
    var now = new Date();
    live.textContent = ok
      ? "live · " + now.toLocaleTimeString()
      : "offline · retrying";
    live.classList.toggle("off", !ok);
  }

  // Someone is about to act inside this panel (a ticked "even if posted", a focused field):
  // replacing its HTML now would undo that.
  function inUse(el) {
    var active = document.activeElement;
    if (active && active !== document.body && el.contains(active) && active.tagName !== "A") return true;
    return !!el.querySelector("input[type=checkbox]:checked");
  }

  function refresh(el, force) {
    if (el.dataset.paused === "1" || el.dataset.busy === "1") return Promise.resolve();
    if (!force && inUse(el)) return Promise.resolve();
    el.dataset.busy = "1";
    return fetch(el.dataset.src, { credentials: "same-origin", headers: { "X-Requested-With": "fetch" } })
      .then(function (r) {
        if (!r.ok) throw new Error("HTTP " + r.status);
        return r.text();
      })
      .then(function (html) {
        if (html !== el.dataset.last) {
          // Keep open <details> open across the refresh.
          var open = Array.from(el.querySelectorAll("details[data-key][open]")).map(function (d) { return d.dataset.key; });
          el.innerHTML = html;
          el.dataset.last = html;
          open.forEach(function (key) {
            var d = el.querySelector('details[data-key="' + key + '"]');
            if (d) d.open = true;
          });
        }
        setLive(true);
      })
      .catch(function () { setLive(false); })
      .finally(function () { el.dataset.busy = "0"; });
  }

  function start(el) {
    var every = Math.max(1, parseFloat(el.dataset.refresh || "5")) * 1000;
    setInterval(function () { if (!document.hidden) refresh(el); }, every);
  }

  // Filter and search forms update their panel in place (and the address bar, so a reload or
  // a shared link shows the same view).
  function wireForm(form) {
    var target = document.getElementById(form.dataset.target);
    if (!target) return;
    function apply(ev) {
      if (ev) ev.preventDefault();
      var params = new URLSearchParams(new FormData(form));
      Array.from(params.keys()).forEach(function (k) { if (!params.get(k)) params.delete(k); });
      var name = target.id.replace(/-panel$/, "");
      var keep = new URLSearchParams(location.search);
      Array.from(form.elements).forEach(function (f) { if (f.name) keep.delete(f.name); });
      if (name === "orders") Array.from(keep.keys()).forEach(function (k) { if (k.indexOf("page_") === 0) keep.delete(k); });
      params.forEach(function (v, k) { keep.set(k, v); });
      var qs = keep.toString();
      history.replaceState(null, "", "/" + (qs ? "?" + qs : "") + "#" + name);
      var own = new URLSearchParams();
      params.forEach(function (v, k) { own.set(k, v); });
      target.dataset.src = "/fragments/" + name + (own.toString() ? "?" + own.toString() : "");
      refresh(target, true);
    }
    form.addEventListener("submit", apply);
    Array.from(form.querySelectorAll("select")).forEach(function (s) { s.addEventListener("change", apply); });
  }

  document.addEventListener("submit", function (ev) {
    var form = ev.target;
    if (form && form.dataset && form.dataset.confirm && !window.confirm(form.dataset.confirm)) {
      ev.preventDefault();
    }
  }, true);

  document.addEventListener("DOMContentLoaded", function () {
    Array.from(document.querySelectorAll("[data-fragment]")).forEach(start);
    Array.from(document.querySelectorAll("form[data-target]")).forEach(wireForm);
    Array.from(document.querySelectorAll("[data-follow]")).forEach(function (box) {
      var target = document.getElementById(box.dataset.follow);
      if (!target) return;
      box.addEventListener("change", function () {
        target.dataset.paused = box.checked ? "0" : "1";
        if (box.checked) refresh(target, true);
      });
    });
    setLive(true);
  });
})();
